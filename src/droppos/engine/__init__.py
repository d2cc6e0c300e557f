"""The training engine: distributed setup, optimisation, precision, checkpoints and logging."""
