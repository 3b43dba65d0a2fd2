"""Training: the loop, its plan and build, steps, optimizer, mixup, fine-tuning, metrics."""
