"""Strip-MLP on caltech101 as in the paper (224 px, same recipe); the argument picks the variant.

python train.py --config configs/caltech101.py:small --workdir DIR   # default variant: tiny_light
(folder source: add --config.data.folder_root=/path/to/101_OCategories_Split82)
"""

from configs import common


def get_config(variant: str = "tiny_light"):
  return common.small_data_config("caltech101", variant)
