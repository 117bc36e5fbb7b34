"""Training: the shared loop, optimizers, checkpoints, and the stages built on them."""
