"""The embedded default data set: synthetic prompts and their images (TFDS).

Each example is a Stable-Diffusion-like prompt sampled from
`synthetic_grammar`, the image `synthetic_render` draws for it, the visible
part of the prompt and a count vector of the rendered attributes (the input of
the ridge "oracle"). Example `index` of `split` is a pure function of
(seed, split, index, image_size), so a build is byte-identical wherever and in
whatever order it runs. Nothing is downloaded.

    builder = synthetic.build(data_dir, seed=0, image_size=64)
    source = builder.as_data_source('train')  # array_record, random access

Splits: train, validation and test in the standard domain; test_shifted in
the shifted domain (another palette and style mix, same vocabulary). Record i
of a split is example i (`id` 'train/00000012' is record 12).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import functools
import json
import os
import tempfile
import time
from typing import Any

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from reverse_sd.data import synthetic_grammar as grammar
from reverse_sd.data import synthetic_render

SPLITS: tuple[str, ...] = ('train', 'validation', 'test', 'test_shifted')
SPLIT_DOMAIN: dict[str, str] = {
    'train': 'standard', 'validation': 'standard', 'test': 'standard',
    'test_shifted': 'shifted',
}
_PROGRESS_EVERY = 5000  # Examples between progress log lines.


class BrokenBuildError(RuntimeError):
  """A prepared data set on disk is incomplete or unreadable."""


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Seed, image size and split sizes; `make_config` names it after them."""

  seed: int = 0
  image_size: int = 64
  num_train: int = 20_000
  num_validation: int = 1_000
  num_test: int = 2_000
  num_test_shifted: int = 2_000
  max_objects: int = grammar.MAX_OBJECTS

  def num_examples(self, split: str) -> int:
    return getattr(self, f'num_{split}')


def config_name(*, seed: int, image_size: int, num_train: int,
                num_validation: int, num_test: int, num_test_shifted: int,
                max_objects: int = grammar.MAX_OBJECTS) -> str:
  """E.g. 'seed0_64px_20000-1000-2000-2000' (with '_1obj' appended when
  scenes have at most one object); one cache folder per setting."""
  name = (f'seed{seed}_{image_size}px_'
          f'{num_train}-{num_validation}-{num_test}-{num_test_shifted}')
  if max_objects != grammar.MAX_OBJECTS:
    name += f'_{max_objects}obj'
  return name


def _new_config(**settings: int) -> SyntheticConfig:
  return SyntheticConfig(name=config_name(**settings), **settings)


DEFAULT_CONFIG = _new_config(seed=0, image_size=64, num_train=20_000,
                             num_validation=1_000, num_test=2_000,
                             num_test_shifted=2_000)


def make_config(*, seed: int = 0, image_size: int = 64,
                num_train: int = 20_000, num_validation: int = 1_000,
                num_test: int = 2_000, num_test_shifted: int = 2_000,
                max_objects: int = grammar.MAX_OBJECTS) -> SyntheticConfig:
  """Validates the settings and returns the config named after them."""
  settings = dict(seed=seed, image_size=image_size, num_train=num_train,
                  num_validation=num_validation, num_test=num_test,
                  num_test_shifted=num_test_shifted, max_objects=max_objects)
  for key, value in settings.items():
    minimum = {'seed': 0, 'image_size': 16}.get(key, 1)
    if not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f'{key} must be an integer >= {minimum}, got {value!r}')
    settings[key] = int(value)
  if settings['max_objects'] > grammar.MAX_OBJECTS:
    raise ValueError(f'max_objects must be at most {grammar.MAX_OBJECTS}, '
                     f'got {max_objects!r}')
  if config_name(**settings) == DEFAULT_CONFIG.name:
    return DEFAULT_CONFIG  # TFDS refuses a second config of a known name.
  return _new_config(**settings)


def example_scene(seed: int, split: str, index: int,
                  max_objects: int = grammar.MAX_OBJECTS) -> grammar.Scene:
  """The scene of example `index` of `split`: a pure function of the
  arguments (`generate_example` renders it)."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  return grammar.sample_scene(rng, SPLIT_DOMAIN[split], max_objects)


def generate_example(seed: int, split: str, index: int,
                     image_size: int = 64,
                     max_objects: int = grammar.MAX_OBJECTS) -> dict[str, Any]:
  """Example `index` of `split`: a pure function of the arguments.

  Returns the builder's features, with `image` a uint8
  (image_size, image_size, 3) array and `attributes` a uint8 vector indexed
  by `synthetic_grammar.ATTRIBUTE_NAMES`.
  """
  scene = example_scene(seed, split, index, max_objects)
  return {
      'id': f'{split}/{index:08d}',
      'image': synthetic_render.render(scene, image_size),
      'prompt': scene.prompt,
      'rendered_prompt': scene.rendered_prompt,
      'alignment': np.float32(scene.alignment),
      'attributes': grammar.attribute_vector(scene),
      'domain': scene.domain,
  }


def features(image_size: int, **extra: tfds.features.FeatureConnector
             ) -> tfds.features.FeaturesDict:
  """An example's features (a data set built on this one adds `extra`)."""
  return tfds.features.FeaturesDict({
      'id': tfds.features.Text(),
      'image': tfds.features.Image(shape=(image_size, image_size, 3),
                                   encoding_format='png'),
      'prompt': tfds.features.Text(),
      'rendered_prompt': tfds.features.Text(),
      'alignment': tfds.features.Scalar(dtype=np.float32),
      'attributes': tfds.features.Tensor(
          shape=(len(grammar.ATTRIBUTE_NAMES),), dtype=np.uint8,
          encoding=tfds.features.Encoding.BYTES),
      'domain': tfds.features.Text(),
      **extra,
  })


class SyntheticPrompts(tfds.core.GeneratorBasedBuilder,
                       skip_registration=True):
  """Synthetic prompt/image pairs; see the module docstring.

  Not in TFDS's global registry: construct it directly or call `build()`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [DEFAULT_CONFIG]
  log_progress = True  # `build(progress=False)` turns it off.

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds this path through `importlib_resources`, which it
    # declares only for Python < 3.9; naming the file avoids that import.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features(self.builder_config.image_size),
        # Record i is example i, so ids and data-source indices agree.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            attribute_names=list(grammar.ATTRIBUTE_NAMES)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(
      self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    config = self.builder_config
    total = config.num_examples(split)
    start = time.perf_counter()
    for index in range(total):
      example = generate_example(config.seed, split, index, config.image_size,
                                 config.max_objects)
      # PNG-encoding here (fast settings) is cheaper than TFDS's TF encoder.
      example['image'] = synthetic_render.encode_png(example['image'])
      yield index, example
      done = index + 1
      if self.log_progress and (done % _PROGRESS_EVERY == 0 or done == total):
        rate = done / max(time.perf_counter() - start, 1e-9)
        logging.info('synthetic %s %s: %d/%d examples, %.0f examples/s',
                     config.name, split, done, total, rate)


def _broken(path, problem: str, variant_dir) -> BrokenBuildError:
  return BrokenBuildError(
      f'{path}: {problem}. The prepared data set in {variant_dir} is '
      'incomplete or corrupt (an interrupted build or copy?). Delete that '
      'folder and call build() again to rebuild it; nothing was deleted.')


def _variant_dir(data_dir: str, config: SyntheticConfig) -> str:
  return os.path.join(data_dir, SyntheticPrompts.name, config.name,
                      str(SyntheticPrompts.VERSION))


def _open_builder(data_dir: str, config: SyntheticConfig) -> SyntheticPrompts:
  """Constructs the builder; a damaged dataset_info.json is a clear error."""
  info_path = os.path.join(_variant_dir(data_dir, config), 'dataset_info.json')
  try:
    return SyntheticPrompts(data_dir=data_dir, config=config,
                            file_format='array_record')
  except Exception as error:  # pylint: disable=broad-except
    if os.path.exists(info_path):
      raise _broken(info_path, f'cannot be read ({type(error).__name__}: '
                    f'{error})', _variant_dir(data_dir, config)) from error
    raise


def _num_records(path: str) -> int:
  # Imported here: only checking a build needs the reader.
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def check_json_file(path: str, broken: Callable[[str, str], Exception]
                    ) -> None:
  """Raises `broken(path, problem)` unless the file exists and is JSON."""
  if not os.path.exists(path):
    raise broken(path, 'is missing')
  try:
    with open(path, encoding='utf-8') as f:
      json.load(f)
  except ValueError as error:
    raise broken(path, f'is not valid JSON ({error})') from error


def check_shards(split_info: tfds.core.SplitInfo,
                 broken: Callable[[str, str], Exception]) -> None:
  """Raises `broken(path, problem)` unless every shard of the split exists
  and holds as many records as dataset_info.json says (reads footers)."""
  for path, expected in zip(split_info.filepaths, split_info.shard_lengths):
    path = os.fspath(path)
    if not os.path.exists(path):
      raise broken(path, 'is missing')
    try:
      found = _num_records(path)
    except Exception as error:  # pylint: disable=broad-except
      raise broken(path, f'cannot be read as array_record ({error})') from error
    if found != expected:
      raise broken(path, f'holds {found} records, not {expected}')


def check_build(builder: SyntheticPrompts) -> None:
  """Raises BrokenBuildError unless every shard opens with the right size.

  Cheap (reads file footers, not records): it catches missing, empty and
  truncated files and a damaged dataset_info.json, not flipped bits inside
  a record.
  """
  variant_dir = os.fspath(builder.data_path)
  info_path = os.path.join(variant_dir, 'dataset_info.json')
  broken = functools.partial(_broken, variant_dir=variant_dir)
  check_json_file(info_path, broken)
  config = builder.builder_config
  for split in SPLITS:
    if split not in builder.info.splits:
      raise _broken(info_path, f'lists no {split!r} split', variant_dir)
    split_info = builder.info.splits[split]
    if split_info.num_examples != config.num_examples(split):
      raise _broken(info_path, f'gives {split} {split_info.num_examples} '
                    f'examples, not {config.num_examples(split)}',
                    variant_dir)
    check_shards(split_info, broken)


def build(data_dir: os.PathLike[str] | str, *, seed: int = 0,
          image_size: int = 64, num_train: int = 20_000,
          num_validation: int = 1_000, num_test: int = 2_000,
          num_test_shifted: int = 2_000,
          max_objects: int = grammar.MAX_OBJECTS,
          progress: bool = True) -> SyntheticPrompts:
  """Builds the corpus under `data_dir` unless it is there; returns the builder.

  Files are array_record, for `builder.as_data_source(split)`. A second call
  with the same arguments only checks the files (milliseconds). A folder that
  exists but is incomplete or corrupt raises BrokenBuildError naming it;
  nothing on disk is ever deleted. Not safe to call from several processes
  at once on one folder: let one process build, then the others call it.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  config = make_config(seed=seed, image_size=image_size, num_train=num_train,
                       num_validation=num_validation, num_test=num_test,
                       num_test_shifted=num_test_shifted,
                       max_objects=max_objects)
  builder = _open_builder(data_dir, config)
  if not os.path.exists(builder.data_path):
    prepare(builder, progress)
  check_build(builder)
  return builder


def prepare(builder: tfds.core.GeneratorBasedBuilder, progress: bool,
            what: str = 'synthetic corpus') -> None:
  """Writes a builder's files (nothing is downloaded); logs the time.

  Shared with the generated data set (`reverse_sd.data.generated`).
  """
  start = time.perf_counter()
  if progress:
    logging.info('Building %s in %s', what, builder.data_path)
  builder.log_progress = progress
  bars_were_on = getattr(tqdm_utils, '_active', True)
  tfds.display_progress_bar(progress)
  try:
    # Nothing is downloaded; the download folder is a throwaway.
    with tempfile.TemporaryDirectory() as download_dir:
      builder.download_and_prepare(
          download_dir=download_dir,
          download_config=tfds.download.DownloadConfig(
              try_download_gcs=False,
              compute_stats=tfds.download.ComputeStatsMode.SKIP),
      )
  finally:
    tfds.display_progress_bar(bars_were_on)
  if progress:
    logging.info('Built %s in %.1f s', builder.data_path,
                 time.perf_counter() - start)
