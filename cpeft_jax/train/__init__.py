"""Training: trainable/frozen split and optimizer (state), the pure train/eval steps (step)."""
