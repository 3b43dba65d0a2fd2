"""Strip-MLP on cifar100 as in the paper (224 px, same recipe); the argument picks the variant.

python train.py --config configs/cifar100.py:small --workdir DIR   # default variant: tiny_light
"""

from configs import common


def get_config(variant: str = "tiny_light"):
  return common.small_data_config("cifar100", variant)
