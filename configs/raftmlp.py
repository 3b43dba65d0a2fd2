"""RaftMLP (Tatsunami and Taki, RaftMLP: How Much Can Be Done Without Attention and with Less
Spatial Locality?) on ImageNet-1K with its own recipe, as the official trainer
(okojoalg/raft-mlp libs/train.py, libs/datasets.py, configs/settings/imagenet-*.yaml) sets
it; the argument picks the variant:

    python train.py --config configs/raftmlp.py:s --workdir DIR \\
        --config.data.data_dir=/path/to/tensorflow_datasets

Where it differs from the Strip-MLP recipe: batch 2048 at lr 2e-3 (scaled linearly for other
batches), warmup from 0 over 5 epochs, then cosine to 1e-5 over the remaining 300 (305 in
all; cosine measured from the end of warmup), weight decay 0.05 on every parameter, no
gradient clipping, drop path 0.1; inputs resized (shorter side 256, bilinear) and randomly
cropped to 224 instead of a random-resized crop, bilinear eval resize. The same: AdamW, label
smoothing 0.1, mixup 0.8 / cutmix 1.0, erasing probability 0.25, RandAugment, flips.
Not reproduced: its ColorJitter(0.4) before RandAugment, and its own RandAugment (the
`randaugment` package) and Cutout; timm's RandAugment and random erasing stand in for them.
"""

from configs import common

DROP_PATH = {"s": 0.1, "m": 0.1, "l": 0.1}


def get_config(variant: str = "s"):
  c = common.family_config("raftmlp", variant, DROP_PATH)
  c.batch_size = 2048
  c.lr.base = 2e-3
  c.lr.warmup = 0.0
  c.lr.min = 1e-5
  c.lr.scaling = "linear_2048"
  c.lr.warmup_prefix = True
  c.warmup_epochs = 5.0
  c.num_epochs = 305.0
  c.grad_clip_norm = 0.0
  c.optimizer.weight_decay_params = "all"
  c.data.resize_random_crop = True
  c.data.interpolation = "bilinear"
  c.lr.timing = "current"  # its trainer sets the lr of update i from i
  c.group_size = 0  # one process (DataParallel, batch 2048): one mixup draw per batch
  c.data.cutmix_alpha = 0.8  # libs/train.py:422 passes the mixup alpha as cutmix_alpha
  c.lock()
  return c
