"""Core metrics: reconstruction, sparsity, and the model's loss with the SAE spliced in."""
