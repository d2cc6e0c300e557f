"""The training engine: one loop, its strategies, checkpoints, guards, logging and setup."""
