"""Input pipeline tests on real files written here: an ImageFolder of JPEGs (+1 PNG), a TFDS
dataset built locally, and the embedded digits. No mocks.

Every generated image has one uniform colour encoding a unique id (20 + 40 * base-6 digits),
so ids, and through them labels, survive decoding, cropping, flipping and resizing.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from etils import epath  # noqa: E402

from strip_mlp import data_sources, input_pipeline as ip  # noqa: E402

CLASSES = ('ant', 'bee', 'cat')                       # sorted -> labels 0, 1, 2
TRAIN_PER_CLASS = (5, 5, 5)                           # 15 train images
VAL_PER_CLASS = (3, 4, 2)                             # 9 val images (odd: padding needed)
SIZES = ((40, 56), (64, 48), (37, 90), (50, 50), (45, 70))


def id_to_rgb(i: int) -> tuple[int, int, int]:
  return (20 + 40 * (i % 6), 20 + 40 * ((i // 6) % 6), 20 + 40 * (i // 36))


def rgb_to_id(rgb) -> np.ndarray:
  """(..., 3) colours in 0..255 -> ids (nearest code)."""
  d = np.clip(np.round((np.asarray(rgb, np.float64) - 20.0) / 40.0), 0, 5).astype(int)
  return d[..., 0] + 6 * d[..., 1] + 36 * d[..., 2]


def image_ids(images, mean, std) -> np.ndarray:
  """Normalised (B, R, R, 3) batch of uniform images -> ids (B,), from the centre pixel."""
  images = np.asarray(images, np.float32)
  r = images.shape[1] // 2
  rgb = (images[:, r, r, :] * np.asarray(std) + np.asarray(mean)) * 255.0
  return rgb_to_id(rgb)


def write_image_folder(root: str) -> dict[int, int]:
  """root/{train,val}/<class>/*.JPEG (one .png); returns {id: label}."""
  labels, next_id = {}, 0
  for split, counts in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
    for label, (cls, count) in enumerate(zip(CLASSES, counts)):
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for k in range(count):
        h, w = SIZES[(next_id + label) % len(SIZES)]
        image = np.broadcast_to(np.array(id_to_rgb(next_id), np.uint8), (h, w, 3))
        if split == 'train' and cls == 'bee' and k == 0:
          data, ext = tf.io.encode_png(image).numpy(), 'png'
        else:
          data, ext = tf.io.encode_jpeg(image, quality=95).numpy(), 'JPEG'
        with open(os.path.join(root, split, cls, f'img_{next_id:04d}.{ext}'), 'wb') as f:
          f.write(data)
        labels[next_id] = label
        next_id += 1
  return labels


class TinyIds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """8x8 PNG images whose red/green channels hold the example id; label = id % 3."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = epath.Path(__file__)
  TRAIN_IDS = tuple(range(22))
  TEST_IDS = tuple(range(100, 113))

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(self.TRAIN_IDS),
            'test': self._generate_examples(self.TEST_IDS)}

  def _generate_examples(self, ids):
    for i in ids:
      image = np.zeros((8, 8, 3), np.uint8)
      image[..., 0], image[..., 1] = i % 256, i // 256
      yield i, {'image': image, 'label': i % 3}


def write_tiny_tfds(data_dir: str) -> None:
  TinyIds(data_dir=data_dir).download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))


def tiny_ids(images) -> np.ndarray:
  """Batch read with mean 0 / std 1 -> ids (B,)."""
  x = np.round(np.asarray(images, np.float32)[:, 0, 0, :] * 255.0).astype(int)
  return x[:, 0] + 256 * x[:, 1]


# ----------------------------------------------------------------------------- fixtures

NO_AUG = dict(hflip_prob=0.0, randaugment='', random_erasing_prob=0.0)
ID_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def make_cfg(**overrides):
  cfg = ip.default_data_config()
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('imagefolder'))
  return root, write_image_folder(root)


@pytest.fixture(scope='module')
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  write_tiny_tfds(data_dir)
  return data_dir


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('digits_tfds'))


def folder_cfg(root, **kw):
  return make_cfg(source='folder', folder_root=root, image_size=40, **kw)


def tfds_cfg(data_dir, **kw):
  # 8 px ids must survive: no crop, no flip, identity normalisation.
  return make_cfg(source='tfds', name='tiny_ids', data_dir=data_dir, image_size=8,
                  random_resized_crop=False, small_image_padding=0, **NO_AUG, **ID_NORM, **kw)


def batch_ids(source, batch, cfg):
  if source == 'tfds':
    return tiny_ids(batch['image'])
  return image_ids(batch['image'], cfg.mean, cfg.std)


@pytest.fixture
def source_cfg(request, folder, tiny_tfds_dir):
  """(source name, cfg, {id: label} of the train split, of the eval split)."""
  if request.param == 'folder':
    root, labels = folder
    n_train = sum(TRAIN_PER_CLASS)
    train = {i: l for i, l in labels.items() if i < n_train}
    val = {i: l for i, l in labels.items() if i >= n_train}
    return 'folder', folder_cfg(root, **NO_AUG), train, val
  return ('tfds', tfds_cfg(tiny_tfds_dir), {i: i % 3 for i in TinyIds.TRAIN_IDS},
          {i: i % 3 for i in TinyIds.TEST_IDS})


# ----------------------------------------------------------------------------- folder source

def test_folder_info_and_train_batch_shapes_dtypes_ranges(folder):
  root, _ = folder
  cfg = folder_cfg(root, random_erasing_prob=0.0)   # RRC + flip + RandAugment, 40 px
  info = ip.get_dataset_info(cfg)
  assert (info.num_classes, info.num_train, info.num_eval, info.image_size) == (3, 15, 9, 40)
  assert info['eval_split'] == 'val'
  batch = next(ip.create_train_iterator(cfg, 6, None, seed=0))
  assert batch['image'].shape == (6, 40, 40, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (6,) and batch['label'].dtype == np.int32
  assert set(batch['label'].tolist()) <= {0, 1, 2}
  lo = (0.0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  hi = (1.0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  assert np.all(batch['image'] >= lo - 1e-5) and np.all(batch['image'] <= hi + 1e-5)
  assert batch['image'].std() > 0.1


def test_folder_labels_follow_class_folders(folder):
  root, labels = folder
  # Eval transform over both splits (the train split contains a PNG among the JPEGs).
  for split in ('train', 'val'):
    cfg = folder_cfg(root, eval_split=split)
    seen = []
    for batch in ip.create_eval_iterator(cfg, 4, None):
      keep = batch['mask'] > 0
      ids = image_ids(batch['image'], cfg.mean, cfg.std)[keep]
      assert [labels[i] for i in ids] == batch['label'][keep].tolist()
      seen += ids.tolist()
    assert len(seen) == (15 if split == 'train' else 9)
  # Train transform (random resized crop + flip keep the uniform colour).
  cfg = folder_cfg(root, randaugment='', random_erasing_prob=0.0)
  batch = next(ip.create_train_iterator(cfg, 15, None, seed=1))
  ids = image_ids(batch['image'], cfg.mean, cfg.std)
  assert sorted(ids.tolist()) == list(range(15))   # one epoch: every train image once
  assert [labels[i] for i in ids] == batch['label'].tolist()


# ----------------------------------------------------------------------------- per-host splits

@pytest.mark.parametrize('source_cfg', ['folder', 'tfds'], indirect=True)
@pytest.mark.parametrize('process_count', [2, 4])
def test_train_splits_disjoint_and_complete(source_cfg, process_count):
  source, cfg, train, _ = source_cfg
  n_local = len(train) // process_count
  parts = []
  for p in range(process_count):
    it = ip.create_train_iterator(cfg, process_count, None, seed=0, process_index=p,
                                  process_count=process_count)   # local batch 1
    ids = [int(batch_ids(source, next(it), cfg)[0]) for _ in range(2 * n_local)]
    epoch0, epoch1 = ids[:n_local], ids[n_local:]
    assert len(set(epoch0)) == n_local and set(epoch1) == set(epoch0)   # each epoch: a permutation
    parts.append(set(epoch0))
  union = set().union(*parts)
  assert sum(len(s) for s in parts) == len(union) == n_local * process_count   # disjoint
  assert union <= set(train) and len(train) - len(union) < process_count      # complete


@pytest.mark.parametrize('source_cfg', ['folder', 'tfds'], indirect=True)
@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_eval_sees_every_example_once_with_masked_padding(source_cfg, process_count):
  source, cfg, _, evals = source_cfg
  global_batch = 4
  n_batches = ip.num_eval_batches(cfg, global_batch, process_count=process_count)
  local = global_batch // process_count
  assert n_batches == -(-(-(-len(evals) // process_count)) // local)
  seen, padded = [], 0
  for p in range(process_count):
    batches = list(ip.create_eval_iterator(cfg, global_batch, None, process_index=p,
                                           process_count=process_count))
    assert len(batches) == n_batches                     # same count on every process
    for b in batches:
      assert b['image'].shape[0] == local and b['mask'].dtype == np.float32
      keep = b['mask'] == 1.0
      ids = batch_ids(source, b, cfg)[keep]
      assert [evals[i] for i in ids] == b['label'][keep].tolist()
      seen += ids.tolist()
      assert np.all(b['image'][~keep] == 0) and np.all(b['mask'][~keep] == 0)
      padded += int((~keep).sum())
  assert sorted(seen) == sorted(evals)                   # each example exactly once
  assert padded == n_batches * global_batch - len(evals)


# ----------------------------------------------------------------------------- determinism

def test_augmentation_deterministic_for_seed_and_resumable(folder):
  root, _ = folder
  cfg = folder_cfg(root, random_erasing_prob=1.0)       # full recipe, erasing always on

  def take(n, **kw):
    it = ip.create_train_iterator(cfg, 4, None, **kw)
    return [next(it) for _ in range(n)]

  a, b = take(5, seed=3), take(5, seed=3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  other = take(1, seed=4)[0]
  assert not np.array_equal(other['image'], a[0]['image'])
  # 15 images, batch 4: step 3 straddles the epoch boundary; resuming reproduces it exactly.
  resumed = take(2, seed=3, start_step=3)
  for x, y in zip(resumed, a[3:]):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


# ----------------------------------------------------------------------------- embedded digits

def test_embedded_digits_dataset(digits_dir):
  from strip_mlp import digits
  cfg = make_cfg(data_dir=digits_dir)                    # the default: source 'embedded', digits
  info = ip.get_dataset_info(cfg)
  assert (info.name, info.num_classes, info.image_size) == ('digits', 10, 32)
  assert (info.num_train, info.num_eval) == (1438, 359) and info.eval_split == 'test'
  a, b = digits.digits_arrays(), digits.digits_arrays()
  np.testing.assert_array_equal(a['test'][1], b['test'][1])      # deterministic split
  assert a['train'][0].shape == (1438, 32, 32, 3) and a['train'][0].dtype == np.uint8
  assert np.bincount(a['test'][1], minlength=10).min() >= 35      # stratified
  batch = next(ip.create_train_iterator(cfg, 16, None, seed=0))   # full recipe augmentation
  assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and 0 <= batch['label'].min() <= batch['label'].max() < 10
  assert np.isfinite(batch['image']).all()
  # Same TFDS interface by name once prepared.
  assert tfds.builder('digits', data_dir=digits_dir).info.splits['test'].num_examples == 359


def test_embedded_digits_are_learnable(digits_dir):
  """A small MLP trained through the pipeline (pad-crop augmentation) exceeds 90% on 'test'."""
  import optax
  cfg = make_cfg(data_dir=digits_dir, **ip.DIGITS_DEMO_OVERRIDES)
  key = jax.random.PRNGKey(0)
  params = {'w1': jax.random.normal(key, (32 * 32 * 3, 128)) * 0.01, 'b1': np.zeros(128, np.float32),
            'w2': jax.random.normal(jax.random.fold_in(key, 1), (128, 10)) * 0.05,
            'b2': np.zeros(10, np.float32)}

  def logits(p, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p['w1'] + p['b1'])
    return h @ p['w2'] + p['b2']

  opt = optax.adam(2e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, x, y):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  it = ip.create_train_iterator(cfg, 128, None, seed=0)
  for _ in range(60):
    b = next(it)
    params, state = step(params, state, b['image'], b['label'])
  correct = total = 0.0
  for b in ip.create_eval_iterator(cfg, 128, None):
    pred = np.argmax(np.asarray(logits(params, b['image'])), -1)
    correct += float(((pred == b['label']) * b['mask']).sum())
    total += float(b['mask'].sum())
  assert total == 359
  assert correct / total > 0.9, correct / total


# ----------------------------------------------------------------------------- errors

def test_missing_or_bad_dataset_messages(tmp_path, folder, caplog):
  empty = str(tmp_path / 'empty')
  with pytest.raises(data_sources.DatasetNotFoundError) as e:
    ip.get_dataset_info(make_cfg(source='tfds', name='imagenet2012', data_dir=empty))
  msg = str(e.value)
  for part in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
               os.path.join(empty, 'downloads', 'manual'), 'tfds build imagenet2012'):
    assert part in msg
  manual = str(tmp_path / 'manual')
  with pytest.raises(data_sources.DatasetNotFoundError, match=f'manual_dir={manual}'):
    ip.get_dataset_info(make_cfg(source='tfds', name='imagenet2012', data_dir=empty,
                                 manual_dir=manual))
  with pytest.raises(data_sources.DatasetNotFoundError, match='tfds build cifar10') as e:
    ip.get_dataset_info(make_cfg(source='tfds', name='cifar10', data_dir=empty))
  assert f'python -m strip_mlp.data_sources cifar10 --data_dir={empty}' in str(e.value)
  assert 'Variant folder' not in caplog.text   # TFDS's warning about the unprepared dataset
  pets = tmp_path / 'pets'                      # an empty class folder: an error, as in torchvision
  tf.io.write_file(str(pets / 'train/cat/a.png'), tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)))
  tf.io.write_file(str(pets / 'train/dog/notes.txt'), 'not an image')
  with pytest.raises(data_sources.EmptyClassFolderError,
                     match=str(pets / 'train' / 'dog') + ' has no image files'):
    ip.get_dataset_info(make_cfg(source='folder', folder_root=str(pets), eval_split='train'))
  with pytest.raises(ValueError, match='unknown TFDS dataset'):
    ip.get_dataset_info(make_cfg(source='tfds', name='no_such_dataset_xyz', data_dir=empty))
  with pytest.raises(data_sources.DatasetNotFoundError, match=r'root/train/<class>'):
    ip.get_dataset_info(make_cfg(source='folder', folder_root=str(tmp_path / 'nope')))
  with pytest.raises(ValueError, match='unknown data.source'):
    ip.get_dataset_info(make_cfg(source='webdataset'))
  with pytest.raises(ValueError, match='bad split'):
    ip.get_dataset_info(folder_cfg(folder[0], eval_split='holdout'))
  with pytest.raises(ValueError, match='multiple of the process count'):
    ip.create_train_iterator(folder_cfg(folder[0]), 6, None, seed=0, process_index=0,
                             process_count=4)


def test_undecodable_image_is_named_or_skipped(tmp_path, caplog):
  root = str(tmp_path)
  write_image_folder(root)                 # train ids 0-14 (ant 0-4), val ids 15-23 (ant 15-17)
  bad = {s: f'{root}/{s}/ant/img_{i:04d}.JPEG' for s, i in (('train', 4), ('val', 16))}
  for path in bad.values():
    os.truncate(path, os.path.getsize(path) // 2)       # real truncated JPEGs
  cfg = folder_cfg(root, **NO_AUG)
  with pytest.raises(data_sources.UndecodableImageError) as e:
    next(ip.create_train_iterator(cfg, 15, None, seed=0))
  msg = str(e.value)
  assert isinstance(e.value, data_sources.UserError) and '\n' not in msg and bad['train'] in msg
  assert "1 of 15 image files of split 'train'" in msg and 'data.skip_undecodable=True' in msg
  with pytest.raises(data_sources.UndecodableImageError, match=bad['val']):
    list(ip.create_eval_iterator(cfg, 3, None))
  cfg.skip_undecodable = True              # one epoch = the 14 good images; eval sees 8
  batch = next(ip.create_train_iterator(cfg, 14, None, seed=0))
  ids = image_ids(batch['image'], cfg.mean, cfg.std)
  assert set(batch) == {'image', 'label'} and sorted(ids) == [i for i in range(15) if i != 4]
  batches = list(ip.create_eval_iterator(cfg, 3, None))
  ids = np.concatenate([image_ids(b['image'], cfg.mean, cfg.std)[b['mask'] > 0] for b in batches])
  assert sorted(ids) == [15] + list(range(17, 24)) and len(batches) == 3
  assert all(f"skipped 1 example(s) of split '{s}'" in caplog.text for s in ('train', 'val'))


# ----------------------------------------------------------------------------- global arrays

def test_batches_are_global_arrays_sharded_over_data_axis(tiny_tfds_dir):
  assert tf.config.get_visible_devices('GPU') == []     # TF never holds accelerator memory
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  cfg = tfds_cfg(tiny_tfds_dir)
  batch = next(ip.create_train_iterator(cfg, 8, sharding, seed=0))
  evals = list(ip.create_eval_iterator(cfg, 8, sharding))
  assert len(evals) == ip.num_eval_batches(cfg, 8) == 2
  for b in (batch, evals[-1]):
    assert isinstance(b['image'], jax.Array) and b['image'].shape == (8, 8, 8, 3)
    for key, value in b.items():
      assert value.shape[0] == 8
      assert value.sharding.is_equivalent_to(
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')), value.ndim)
      assert len(value.addressable_shards) == len(devices)
      assert value.addressable_shards[0].data.shape[0] == 8 // len(devices)
  assert float(jax.numpy.sum(evals[-1]['mask'])) == 13 - 8
