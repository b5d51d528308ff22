"""The feature browser: a static site per run, built from the store without a forward pass."""
