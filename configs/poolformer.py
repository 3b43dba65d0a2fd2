"""PoolFormer (Yu et al., MetaFormer Is Actually What You Need for Vision, CVPR 2022) on
ImageNet-1K with its own recipe, as the official trainer (sail-sg/poolformer train.py and
README) sets it; the argument picks the variant:

    python train.py --config configs/poolformer.py:s12 --workdir DIR \\
        --config.data.data_dir=/path/to/tensorflow_datasets

Where it differs from the Strip-MLP recipe: lr 1e-3 per 1024 images (README: lr =
batch/1024 * 1e-3) from 1e-6 over 5 warmup epochs, cosine to 1e-5 over 300 epochs then 10
cooldown epochs at 1e-5 (timm's cooldown, 310 in all), no gradient clipping, drop path per
variant, eval crop 0.9 (S) / 0.95 (M). The same as ours: AdamW (wd 0.05, not on 1-D params
and biases), RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0,
label smoothing 0.1, bicubic, batch 1024 (8 GPUs x 128).
timm's lr steps once per epoch (a staircase: `lr.timing = "epoch"`). Not reproduced: its
'random' train interpolation (bilinear or bicubic per image; bicubic here) and apex fp16.
"""

from configs import common

DROP_PATH = {"s12": 0.1, "s24": 0.1, "s36": 0.2, "m36": 0.3, "m48": 0.4}  # README


def get_config(variant: str = "s12"):
  c = common.family_config("poolformer", variant, DROP_PATH)
  c.lr.base = 1e-3
  c.lr.warmup = 1e-6
  c.lr.min = 1e-5
  c.lr.scaling = "linear_1024"
  c.warmup_epochs = 5.0
  c.num_epochs = 310.0
  c.cooldown_epochs = 10.0
  c.grad_clip_norm = 0.0
  c.data.eval_resize_ratio = 1 / (0.9 if variant.startswith("s") else 0.95)  # crop_pct
  c.lr.timing = "epoch"  # timm's scheduler is stepped once per epoch (t_in_epochs=True)
  c.lock()
  return c
