"""Strip-MLP tiny on ImageNet-1K, 224 px, the published 300-epoch recipe.

    python train.py --config configs/imagenet_tiny.py --workdir DIR \
        --config.data.data_dir=/path/to/tensorflow_datasets
"""

from configs import common


def get_config():
  return common.imagenet_config("tiny")
