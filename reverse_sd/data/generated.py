"""The generator's images for the synthetic corpus's prompts (TFDS).

The miniature loop (`python -m reverse_sd.loop`) trains a text-conditioned
diffusion generator on the synthetic corpus, then needs a data set of the
generator's own images for the corpus prompts. This module makes it in two
steps:

1. `generate_shards` calls the caller's `make_batch` (generator + referee) and
   writes `<split>-00003.npz` shard files (images, alignment, indices). Shard
   k of a split holds indices [k * shard_size, (k + 1) * shard_size), each is
   written under a temporary name and renamed when complete, and a rerun
   skips the shards that are there: a killed run loses nothing finished and
   resumes where it stopped, with the same result.
2. `GeneratedPrompts`, a TFDS builder, packs the shards and the synthetic
   source into array_record files. Nothing is generated inside TFDS.

    builder = generated.build(data_dir, synthetic_builder=corpus,
                              generator_id=checkpoint_hash,
                              sampler='ddim20_cfg3.0', make_batch=make_batch)
    builder = generated.open_prepared(data_dir, builder.builder_config.name)

Features: the synthetic corpus's (same `id`, `prompt`, `rendered_prompt`,
`attributes`, `domain`; record i is example i) with `image` the generated
image, `alignment` the referee's alignment of that image with its prompt (in
[0, 1]) and `render_alignment` the synthetic corpus's own alignment.

Determinism: this module adds no randomness. The images are a pure function
of (generator checkpoint, sampler settings, split, index) as long as
`make_batch` is one, i.e. the caller seeds each example from its split and
index, not from the batch it lands in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from reverse_sd.data import synthetic
from reverse_sd.data import synthetic_render

SPLITS = synthetic.SPLITS
SHARDS_DIR = 'generated_shards'  # Under data_dir: one folder per config name.
CONFIG_FILE = 'generated_config.json'  # Beside the prepared data set.
SHARDS_FILE = 'shards.json'  # In a shards folder: how it is laid out.
_SHARD_KEYS = ('images', 'alignment', 'indices')
_SAFE_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')

# make_batch(split, indices [n] int64, examples) -> (images uint8 [n, H, W, 3],
# alignment float32 [n]).
MakeBatch = Callable[[str, np.ndarray, list[dict[str, Any]]],
                     tuple[np.ndarray, np.ndarray]]

BrokenBuildError = synthetic.BrokenBuildError


class BrokenShardError(BrokenBuildError):
  """A generated shard file on disk is unreadable or holds the wrong data."""


class NotBuiltError(FileNotFoundError):
  """The generated data set asked for has not been built."""


@dataclasses.dataclass(eq=False)
class GeneratedConfig(tfds.core.BuilderConfig):
  """What the data set is made from; `config_name` names it after that."""

  generator_id: str = ''
  synthetic_config_name: str = ''
  sampler: str = ''
  image_size: int = 64
  num_train: int = 0
  num_validation: int = 0
  num_test: int = 0
  num_test_shifted: int = 0

  def num_examples(self, split: str) -> int:
    return getattr(self, f'num_{split}')

  def to_json(self) -> dict[str, Any]:
    return {key: getattr(self, key) for key in _CONFIG_FIELDS}


_CONFIG_FIELDS = ('name', 'generator_id', 'synthetic_config_name', 'sampler',
                  'image_size', 'num_train', 'num_validation', 'num_test',
                  'num_test_shifted')


def _short_hash(text: str, length: int = 12) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:length]


def _folder_safe(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]+', '-', text).strip('.-')


def config_name(generator_id: str, synthetic_config_name: str,
                sampler: str) -> str:
  """A folder-safe cache key, e.g.
  'seed0_64px_20000-1000-2000-2000_gen3f2a9c1b7d4e_ddim20_cfg3.0'.

  `generator_id` identifies the generator checkpoint (the caller's string,
  e.g. a hash of the checkpoint path, step and model config); it appears as
  a short hash. `sampler` appears as given when it is folder-safe (letters,
  digits, '.', '_', '-'), else in a folder-safe form followed by a short hash
  of its exact text, so distinct settings never share a name.
  """
  for key, value in (('generator_id', generator_id),
                     ('synthetic_config_name', synthetic_config_name),
                     ('sampler', sampler)):
    if not isinstance(value, str) or not value:
      raise ValueError(f'{key} must be a non-empty string, got {value!r}')
  if not _SAFE_NAME.match(synthetic_config_name):
    raise ValueError('synthetic_config_name must be a synthetic corpus '
                     "config name (letters, digits, '.', '_', '-'), got "
                     f'{synthetic_config_name!r}')
  sampler_part = _folder_safe(sampler)
  if sampler_part != sampler:
    # The folder-safe form lost characters: keep distinct settings distinct.
    sampler_part = f'{sampler_part}-{_short_hash(sampler, 8)}'.strip('-')
  return (f'{synthetic_config_name}_gen{_short_hash(generator_id)}_'
          f'{sampler_part}')


def _config_from_synthetic(synthetic_config: synthetic.SyntheticConfig, *,
                           generator_id: str, sampler: str) -> GeneratedConfig:
  return GeneratedConfig(
      name=config_name(generator_id, synthetic_config.name, sampler),
      generator_id=generator_id,
      synthetic_config_name=synthetic_config.name,
      sampler=sampler,
      image_size=synthetic_config.image_size,
      **{f'num_{split}': synthetic_config.num_examples(split)
         for split in SPLITS})


# --- Step 1: shards -----------------------------------------------------------


def shard_path(out_dir: os.PathLike[str] | str, split: str,
               shard: int) -> str:
  """The file of shard `shard` of `split`, e.g. 'train-00003.npz'."""
  return os.path.join(os.fspath(out_dir), f'{split}-{shard:05d}.npz')


def shard_indices(total: int, shard_size: int) -> list[np.ndarray]:
  """The example indices of each shard of a split of `total` examples."""
  return [np.arange(start, min(start + shard_size, total), dtype=np.int64)
          for start in range(0, total, shard_size)]


def _corrupt(path: str, problem: str) -> BrokenShardError:
  return BrokenShardError(
      f'{path}: {problem}. This generated shard is corrupt or from other '
      'settings (an interrupted copy?). Delete that file and run generation '
      'again to regenerate it; nothing was deleted.')


def load_shard(path: str, expected_indices: np.ndarray,
               image_size: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Reads a shard; (images, alignment) after checking it holds
  `expected_indices`. Raises BrokenShardError naming the file otherwise."""
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [key for key in _SHARD_KEYS if key not in data.files]
      if missing:
        raise _corrupt(path, f'has no {missing} array(s); expected '
                       f'{list(_SHARD_KEYS)}')
      arrays = {key: data[key] for key in _SHARD_KEYS}
  except BrokenShardError:
    raise
  except Exception as error:  # pylint: disable=broad-except
    raise _corrupt(path, f'cannot be read as .npz ({type(error).__name__}: '
                   f'{error})') from error
  indices = arrays['indices']
  if not np.array_equal(indices, expected_indices):
    found = (f'{indices.size} indices {indices[:1].tolist()}..'
             f'{indices[-1:].tolist()}' if indices.ndim == 1 else
             f'indices of shape {indices.shape}')
    raise _corrupt(path, f'holds {found}, expected {expected_indices.size} '
                   f'indices {expected_indices[0]}..{expected_indices[-1]}')
  try:
    images, alignment = _check_batch(arrays['images'], arrays['alignment'],
                                     len(expected_indices), image_size)
  except ValueError as error:
    raise _corrupt(path, str(error)) from error
  return images, alignment


def _check_batch(images: Any, alignment: Any, count: int,
                 image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Raises ValueError unless images are uint8 [count, S, S, 3] and
  alignment float32 [count] in [0, 1]."""
  images = np.asarray(images)
  alignment = np.asarray(alignment)
  size = image_size or (images.shape[1] if images.ndim == 4 else 0)
  expected_shape = (count, size, size, 3)
  if images.dtype != np.uint8 or images.shape != expected_shape:
    raise ValueError(f'images are {images.dtype} {images.shape}, expected '
                     f'uint8 {expected_shape}')
  if alignment.dtype != np.float32 or alignment.shape != (count,):
    raise ValueError(f'alignment is {alignment.dtype} {alignment.shape}, '
                     f'expected float32 ({count},)')
  if not np.all((alignment >= 0) & (alignment <= 1)):  # Also catches NaN.
    raise ValueError(f'alignment has values outside [0, 1]: '
                     f'{alignment[~((alignment >= 0) & (alignment <= 1))]}')
  return images, alignment


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes the .npz under a temporary name, then renames it into place, so
  `path` exists only when complete."""
  # A leftover of a killed write has this name and is overwritten: it never
  # held a complete shard.
  temp_path = path + '.incomplete'
  with open(temp_path, 'wb') as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temp_path, path)


def _check_layout(out_dir: str, shard_size: int) -> None:
  """Records the shard size in the folder; a rerun with another one is a
  clear error (the files on disk would hold other index ranges)."""
  path = os.path.join(out_dir, SHARDS_FILE)
  if os.path.exists(path):
    try:
      with open(path, encoding='utf-8') as f:
        recorded = json.load(f)['shard_size']
    except (ValueError, KeyError, TypeError) as error:
      raise _corrupt(path, f'is not a JSON object with "shard_size" '
                     f'({error})') from error
    if recorded != shard_size:
      raise ValueError(
          f'{path}: the shards in {out_dir} were written with shard_size='
          f'{recorded}, not {shard_size}. Pass shard_size={recorded} to '
          'resume, or delete that folder to regenerate every shard.')
    return
  temp_path = path + '.incomplete'
  with open(temp_path, 'w', encoding='utf-8') as f:
    json.dump({'shard_size': shard_size}, f)
  os.replace(temp_path, path)


def _read_examples(source: Any, indices: np.ndarray) -> list[dict[str, Any]]:
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(indices.tolist()))
  return [source[int(index)] for index in indices]


def generate_shards(out_dir: os.PathLike[str] | str, source: Sequence[Any],
                    split: str, make_batch: MakeBatch, *,
                    shard_size: int = 256, image_size: int | None = None,
                    progress: bool = True) -> list[str]:
  """Writes the missing shards of `split` to `out_dir`; returns all paths.

  Args:
    out_dir: the shards folder (created if needed).
    source: the synthetic corpus's data source for `split` (anything with
      `len` and `[i]` giving examples with 'id', 'prompt', ...).
    split: the split name, passed to `make_batch` and naming the files.
    make_batch: `(split, indices, examples) -> (images, alignment)`, images
      uint8 [n, H, W, 3] and alignment float32 [n] in [0, 1].
    shard_size: examples per shard; shard k holds indices
      [k * shard_size, (k + 1) * shard_size).
    image_size: if given, the H = W that images must have.
    progress: log progress (examples/s) after each shard.

  Existing shards are checked (they load and hold the expected indices) and
  skipped; a corrupt one raises BrokenShardError naming it (it is not
  deleted). A shard is renamed into place only when complete, so a killed
  run keeps every finished shard and a rerun completes the rest.
  """
  if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
    raise ValueError(f'shard_size must be an integer >= 1, got '
                     f'{shard_size!r}')
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  _check_layout(out_dir, int(shard_size))
  total = len(source)
  shards = shard_indices(total, int(shard_size))
  paths = [shard_path(out_dir, split, k) for k in range(len(shards))]
  start = time.perf_counter()
  generated = 0
  for path, indices in zip(paths, shards):
    if os.path.exists(path):
      load_shard(path, indices, image_size)
      continue
    examples = _read_examples(source, indices)
    batch = make_batch(split, indices, examples)
    try:
      images, alignment = batch
      images, alignment = _check_batch(images, alignment, len(indices),
                                       image_size)
    except (TypeError, ValueError) as error:
      raise ValueError(
          f'make_batch({split!r}, indices {indices[0]}..{indices[-1]}) '
          f'returned bad data for {path}: {error}') from error
    _write_atomically(path, {'images': images, 'alignment': alignment,
                             'indices': indices})
    generated += len(indices)
    if progress:
      done = int(indices[-1]) + 1
      rate = generated / max(time.perf_counter() - start, 1e-9)
      logging.info('generated %s %s: %d/%d examples, %.1f examples/s',
                   os.path.basename(out_dir), split, done, total, rate)
  return paths


# --- Step 2: the TFDS builder -------------------------------------------------


class GeneratedPrompts(tfds.core.GeneratorBasedBuilder,
                       skip_registration=True):
  """The generator's images for the synthetic prompts; see the module
  docstring. Construct it through `build()` or `open_prepared()`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  log_progress = True  # `build(progress=False)` turns it off.

  def __init__(self, *, synthetic_builder: Any = None, shards_dir: str = '',
               **kwargs):
    # Only preparing reads these; opening a prepared data set needs neither.
    self._synthetic_builder = synthetic_builder
    self._shards_dir = shards_dir
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # As in synthetic.SyntheticPrompts: avoids an importlib_resources lookup.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    # The synthetic corpus's features; 'alignment' is the referee's and
    # 'render_alignment' the grammar's (see the module docstring).
    features = synthetic.features(
        config.image_size,
        render_alignment=tfds.features.Scalar(dtype=np.float32))
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features,
        # Record i is example i, so ids and data-source indices agree.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            attribute_names=list(synthetic.grammar.ATTRIBUTE_NAMES),
            generator_id=config.generator_id,
            synthetic_config_name=config.synthetic_config_name,
            sampler=config.sampler),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    if self._synthetic_builder is None or not self._shards_dir:
      raise ValueError(
          f'GeneratedPrompts {self.builder_config.name} needs the synthetic '
          'builder and the shards folder to prepare; call generated.build().')
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(
      self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    config = self.builder_config
    source = self._synthetic_builder.as_data_source(split)
    total = config.num_examples(split)
    if len(source) != total:
      raise ValueError(f'The synthetic corpus {config.synthetic_config_name} '
                       f'has {len(source)} {split} examples, expected {total}.')
    shard_size = _recorded_shard_size(self._shards_dir)
    start = time.perf_counter()
    for k, indices in enumerate(shard_indices(total, shard_size)):
      path = shard_path(self._shards_dir, split, k)
      if not os.path.exists(path):
        raise NotBuiltError(
            f'{path} is missing: run generation first '
            '(generated.build() or generated.generate_shards()).')
      images, alignment = load_shard(path, indices, config.image_size)
      examples = _read_examples(source, indices)
      for index, image, score, example in zip(indices, images, alignment,
                                              examples):
        yield int(index), {
            'id': example['id'],
            'image': synthetic_render.encode_png(image),
            'prompt': example['prompt'],
            'rendered_prompt': example['rendered_prompt'],
            'alignment': score,
            'render_alignment': np.float32(example['alignment']),
            'attributes': np.asarray(example['attributes'], np.uint8),
            'domain': example['domain'],
        }
      if self.log_progress:
        done = int(indices[-1]) + 1
        rate = done / max(time.perf_counter() - start, 1e-9)
        logging.info('packing %s %s: %d/%d examples, %.0f examples/s',
                     config.name, split, done, total, rate)


def _recorded_shard_size(shards_dir: str) -> int:
  path = os.path.join(shards_dir, SHARDS_FILE)
  if not os.path.exists(path):
    raise NotBuiltError(f'{path} is missing: run generation first '
                        '(generated.build() or generated.generate_shards()).')
  try:
    with open(path, encoding='utf-8') as f:
      return int(json.load(f)['shard_size'])
  except (ValueError, KeyError, TypeError) as error:
    raise _corrupt(path, f'is not a JSON object with "shard_size" ({error})'
                   ) from error


def _config_dir(data_dir: str, name: str) -> str:
  return os.path.join(data_dir, GeneratedPrompts.name, name)


def _open_builder(data_dir: str, config: GeneratedConfig,
                  **kwargs) -> GeneratedPrompts:
  """Constructs the builder; a damaged dataset_info.json is a clear error."""
  variant_dir = os.path.join(_config_dir(data_dir, config.name),
                             str(GeneratedPrompts.VERSION))
  info_path = os.path.join(variant_dir, 'dataset_info.json')
  try:
    return GeneratedPrompts(data_dir=data_dir, config=config,
                            file_format='array_record', **kwargs)
  except Exception as error:  # pylint: disable=broad-except
    if os.path.exists(info_path):
      raise synthetic.BrokenBuildError(
          f'{info_path}: cannot be read ({type(error).__name__}: {error}). '
          f'The prepared data set in {variant_dir} is incomplete or corrupt; '
          'delete that folder and call build() again; nothing was deleted.'
      ) from error
    raise


def _write_config(path: str, config: GeneratedConfig) -> None:
  """Writes the config JSON (atomically); an existing one must agree."""
  if os.path.exists(path):
    recorded = _read_config_json(path)
    if recorded != config.to_json():
      raise BrokenBuildError(
          f'{path}: records {recorded}, which differs from this build\'s '
          f'{config.to_json()} under the same name. Delete that file (and '
          'the data set folder beside it) to rebuild; nothing was deleted.')
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temp_path = path + '.incomplete'
  with open(temp_path, 'w', encoding='utf-8') as f:
    json.dump(config.to_json(), f, indent=2, sort_keys=True)
  os.replace(temp_path, path)


def _read_config_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      recorded = json.load(f)
    missing = [key for key in _CONFIG_FIELDS if key not in recorded]
    if missing:
      raise ValueError(f'keys {missing} are missing')
    return {key: recorded[key] for key in _CONFIG_FIELDS}
  except (ValueError, TypeError) as error:
    raise BrokenBuildError(
        f'{path}: is not a generated data set config ({error}); expected a '
        f'JSON object with keys {list(_CONFIG_FIELDS)}. Delete the folder '
        'that holds it and build again; nothing was deleted.') from error


def build(data_dir: os.PathLike[str] | str, *,
          synthetic_builder: synthetic.SyntheticPrompts, generator_id: str,
          sampler: str, make_batch: MakeBatch, shard_size: int = 256,
          progress: bool = True) -> GeneratedPrompts:
  """Generates and prepares the data set under `data_dir` unless it is there.

  Args:
    data_dir: the data folder (shards go to
      `data_dir/generated_shards/<config name>/`, the TFDS files to
      `data_dir/generated_prompts/<config name>/`).
    synthetic_builder: the prepared synthetic corpus (`synthetic.build`)
      whose prompts, ids and attributes the data set takes.
    generator_id: identifies the generator checkpoint (see `config_name`).
    sampler: the sampler settings, e.g. 'ddim20_cfg3.0'.
    make_batch: `(split, indices, examples) -> (images, alignment)`; see
      `generate_shards`. It should seed each example from (split, index).
    shard_size: examples per shard file.
    progress: log progress.

  Returns:
    The prepared builder (`builder.as_data_source(split)`). A second call
    only checks the files and never calls `make_batch`. A damaged build
    raises BrokenBuildError naming the file; nothing is ever deleted. Not
    safe to call from several processes at once on one folder.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  config = _config_from_synthetic(synthetic_builder.builder_config,
                                  generator_id=generator_id, sampler=sampler)
  shards_dir = os.path.join(data_dir, SHARDS_DIR, config.name)
  config_path = os.path.join(_config_dir(data_dir, config.name), CONFIG_FILE)
  builder = _open_builder(data_dir, config,
                          synthetic_builder=synthetic_builder,
                          shards_dir=shards_dir)
  if not os.path.exists(builder.data_path):
    start = time.perf_counter()
    for split in SPLITS:
      generate_shards(shards_dir, synthetic_builder.as_data_source(split),
                      split, make_batch, shard_size=shard_size,
                      image_size=config.image_size, progress=progress)
    if progress:
      logging.info('Generated shards in %s (%.1f s)', shards_dir,
                   time.perf_counter() - start)
    _write_config(config_path, config)
    synthetic.prepare(builder, progress, 'generated data set')
  else:
    _write_config(config_path, config)
  synthetic.check_build(builder)
  return builder


def open_prepared(data_dir: os.PathLike[str] | str,
                  name: str) -> GeneratedPrompts:
  """Opens the data set `build()` prepared under `data_dir` as `name` (its
  config name); raises NotBuiltError when it is not there."""
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if not isinstance(name, str) or not _SAFE_NAME.match(name):
    raise ValueError(f'name must be a generated data set config name '
                     f"(letters, digits, '.', '_', '-'), got {name!r}")
  config_path = os.path.join(_config_dir(data_dir, name), CONFIG_FILE)
  variant_dir = os.path.join(_config_dir(data_dir, name),
                             str(GeneratedPrompts.VERSION))
  if not os.path.exists(config_path) or not os.path.exists(variant_dir):
    built = sorted(os.listdir(os.path.join(data_dir, GeneratedPrompts.name))
                   ) if os.path.isdir(os.path.join(
                       data_dir, GeneratedPrompts.name)) else []
    raise NotBuiltError(
        f'Generated data set {name!r} is not built in {data_dir} (no '
        f'{config_path if not os.path.exists(config_path) else variant_dir}'
        f'); built ones: {built}. Run python -m reverse_sd.loop with this '
        'data_dir to generate it.')
  recorded = _read_config_json(config_path)
  if recorded['name'] != name:
    raise BrokenBuildError(f'{config_path}: names config '
                           f'{recorded["name"]!r}, expected {name!r}; it was '
                           'moved or edited. Nothing was deleted.')
  config = GeneratedConfig(**recorded)
  builder = _open_builder(data_dir, config)
  synthetic.check_build(builder)
  return builder
