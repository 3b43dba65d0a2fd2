"""The keys shared by every training config, with the published recipe as defaults.

Every config file builds on `base_config()` and changes only what differs. All keys can be
overridden on the command line (`--config.lr.base=1e-3 --config.model.variant=small`);
unknown keys and wrongly typed values are refused before anything is compiled.

Durations are given in epochs and can be given in steps instead: a `*_steps` key that is
set (not None) wins over its `*_epochs` twin. One step = one optimizer update on
`batch_size` images (the global batch over all devices and processes).
"""

import ml_collections
from ml_collections import config_dict

from strip_mlp.data import config as data_config
from strip_mlp.models.strip_mlp import VARIANTS


def base_config() -> ml_collections.ConfigDict:
  """The published ImageNet-1K recipe (the paper's, with the official code's defaults)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.variant = "tiny_light"  # tiny_light | tiny | small | base | '' (embed_dim+layers)
  c.model.embed_dim = config_dict.placeholder(int)  # overrides the variant's
  c.model.layers = config_dict.placeholder(tuple)  # e.g. '(2,2,6,2)'
  c.model.num_classes = config_dict.placeholder(int)  # None: from the dataset
  c.model.img_size = config_dict.placeholder(int)  # None: data.image_size
  c.model.drop_path_rate = 0.1  # released trainer: 0.1 in every block
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay f32)
  # Formulation of the ops (same parameters, same function; strip_mlp.models.ops): 'auto' picks
  # the fastest per backend. depthwise: auto | xla | shift; patchify: auto | xla | einsum.
  c.model.depthwise_impl = "auto"
  c.model.patchify_impl = "auto"
  c.model.remat = False  # recompute each block in the backward pass (memory)
  # Another family by variant name (strip_mlp.models.registry): poolformer_s12 ... poolformer_m48,
  # raftmlp_s/m/l, msmlp_t/s/b; '' is Strip-MLP (model.variant / embed_dim + layers).
  c.model.name = ""

  # Input pipeline keys (strip_mlp.data.config.default_data_config): source, name,
  # data_dir, image_size, augmentation, mixup/cutmix and label smoothing.
  c.data = data_config.default_data_config()
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.image_size = 224

  c.batch_size = 1024  # global (all devices/processes), per optimizer update
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
  c.grad_accum_steps = 1  # micro-batches per update (same update, less memory)
  # Examples per group: BatchNorm batch statistics and mixup/cutmix draws are taken per
  # group of this many consecutive examples of each micro-batch, as the released trainer
  # takes them per GPU (DDP without SyncBN, `--batch-size 128` per GPU, mixup per
  # process). 0: over the whole (micro-)batch.
  c.group_size = 128

  c.num_epochs = 300.0
  c.num_steps = config_dict.placeholder(int)  # set: wins over num_epochs
  c.warmup_epochs = 20.0
  c.warmup_steps = config_dict.placeholder(int)
  c.cooldown_epochs = 0.0  # the last ones at lr.min after the cosine (timm's cooldown)
  c.cooldown_steps = config_dict.placeholder(int)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.weight_decay_params = "matrices"  # not 1-D params or biases | 'all'
  c.grad_clip_norm = 5.0  # global norm; 0 disables

  c.lr = ml_collections.ConfigDict()
  c.lr.base = 5e-4
  c.lr.warmup = 5e-7  # lr at step 0, ramped linearly to base
  c.lr.min = 5e-6  # end of the cosine
  # Each of base/warmup/min is multiplied by the rule's factor of batch_size: 'none', or
  # 'linear_N' (x batch/N, e.g. Swin's linear_512) or 'sqrt_N'. The released main.py
  # computes lr * batch * world_size / EPOCHS and never assigns it (config.defrost() is
  # followed by config.freeze()): the released runs use 'none', at any batch size.
  c.lr.scaling = "none"
  c.lr.schedule = "cosine"  # cosine | constant (after the warmup)
  c.lr.warmup_prefix = False  # timm default: cosine phase measured from step 0
  # Which schedule value an update uses (strip_mlp.train.optim.LR_TIMINGS): 'released': update i
  # uses lr(max(i - 1, 0)) (the released train_one_epoch steps the scheduler after the
  # update); 'current': lr(i); 'epoch': lr at the start of i's epoch (timm per epoch).
  c.lr.timing = "released"

  c.ema_decay = 0.0  # > 0: EMA of params and BN stats, evaluated too

  c.log_every_steps = 100
  c.eval_every_epochs = 1.0
  c.eval_every_steps = config_dict.placeholder(int)
  c.checkpoint_every_epochs = 20.0  # released trainer: every 20 epochs and the last
  c.checkpoint_every_steps = config_dict.placeholder(int)
  c.keep_checkpoints = 3  # newest K
  c.keep_best = True  # also keep the best by eval top-1
  c.async_checkpointing = True
  c.tensorboard = False  # metrics.jsonl always; TensorBoard events too if True

  c.init_from = ""  # fine-tune: converted checkpoint dir, .pth or workdir
  c.init_resize = ""  # 'interpolate': weights of another img_size, resampled
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1  # > 1: shard params/optimizer state over this many devices
  return c


def imagenet_config(variant: str) -> ml_collections.ConfigDict:
  """ImageNet-1K at 224 px, 300 epochs, the published recipe."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {tuple(VARIANTS)}")
  c = base_config()
  c.model.variant = variant
  c.lock()
  return c


def family_config(family: str, variant: str, drop_path: dict) -> ml_collections.ConfigDict:
  """base_config() training `<family>_<variant>` (strip_mlp.models.registry) with its paper's drop
  path; the caller sets the rest of that paper's recipe and locks the config."""
  if variant not in drop_path:
    raise ValueError(
        f"unknown {family} variant {variant!r}; choose one of {tuple(drop_path)} "
        f"(e.g. --config configs/{family}.py:{next(iter(drop_path))})"
    )
  c = base_config()
  c.model.name = f"{family}_{variant}"
  c.model.drop_path_rate = drop_path[variant]
  return c


def small_data_config(name: str, variant: str) -> ml_collections.ConfigDict:
  """CIFAR-10/100 (TFDS, 32 px upscaled to 224) and Caltech-101 (80/20 per-class split,
  seed 1024, as a folder), same recipe otherwise (paper, Sec. 4)."""
  variant = variant or "tiny_light"
  if variant not in VARIANTS:
    raise ValueError(
        f"unknown variant {variant!r}; choose one of {tuple(VARIANTS)} "
        "(e.g. --config configs/cifar10.py:small)"
    )
  c = base_config()
  c.model.variant = variant
  c.data.image_size = 224
  c.data.small_image_size = 0  # the 224 px upscale gets the ImageNet augmentation
  if name == "caltech101":
    c.data.source = "folder"  # root/train/<class>/*, root/val/<class>/* as written by
    c.data.name = "caltech101"  # the released categories101_train_val_split.py
  else:
    c.data.name = name
  c.batch_size = 256
  c.log_every_steps = 50
  c.lock()
  return c
