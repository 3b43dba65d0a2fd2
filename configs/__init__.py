"""Training configs: `python train.py --config configs/<name>.py[:arg] --workdir DIR`."""
