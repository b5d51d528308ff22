"""A researcher's workbench on one SAE: what a clamp does to the model's words (generate), which
features fire on any text (activations), and the loading both share (load)."""
