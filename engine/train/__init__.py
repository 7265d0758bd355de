"""Training: the loop, methods, noise and losses, optimizers and schedulers, sampling, checkpoints."""
