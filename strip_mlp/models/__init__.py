"""Vision-MLP relatives of Strip-MLP in Flax (NHWC), one module per family."""
