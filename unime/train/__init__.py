"""The training engine: typed configs, GradCache, checkpoints and the one training loop."""
