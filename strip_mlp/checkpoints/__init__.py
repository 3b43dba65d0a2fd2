"""What is on disk: model and training checkpoints, recovery, the workdir lock, storage errors."""
