"""MS-MLP (Zheng et al., Mixing and Shifting: Exploiting Global and Local Dependencies in
Vision MLPs) on ImageNet-1K with its own recipe, as the official trainer (JegZheng/MS-MLP
config.py, configs/*.yaml, main.py) sets it; the argument picks the variant:

    python train.py --config configs/msmlp.py:t --workdir DIR \\
        --config.data.data_dir=/path/to/tensorflow_datasets

The trainer is Swin's, like Strip-MLP's: AdamW (wd 0.05, not on 1-D params and biases),
warmup 5e-7 -> 5e-4 over 20 epochs, cosine to 5e-6 over 300 epochs (timm, per update),
gradient clipping 5.0, RandAugment, random erasing 0.25, mixup 0.8 / cutmix 1.0, label
smoothing 0.1, bicubic, eval crop 224/256, batch 1024 (8 GPUs x 128). Where it differs: each
lr is scaled by batch/512 (Swin's rule, Strip-MLP's is batch/300), drop path per variant.
MS-MLP-B was trained as 8 x 64 with 2 accumulation steps (README: --batch-size 64
--accumulation-steps 2): its config here accumulates 2 micro-batches with groups of 64.
"""

from configs import common

DROP_PATH = {"t": 0.1, "s": 0.4, "b": 0.5}  # configs/msmlp_*_patch4_shift5_224.yaml


def get_config(variant: str = "t"):
  c = common.family_config("msmlp", variant, DROP_PATH)
  c.lr.scaling = "linear_512"  # main.py assigns lr * total batch / 512 (Swin's rule)
  if variant == "b":
    c.grad_accum_steps = 2
    c.group_size = 64
  c.lock()
  return c
