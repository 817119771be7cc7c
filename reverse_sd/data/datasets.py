"""Opens the configured data set: builds it if needed, attaches the targets."""

from collections.abc import Sequence
import functools
import os
import pathlib

import ml_collections

from reverse_sd.data import pipeline
from reverse_sd.data import preprocess
from reverse_sd.data import targets as targets_lib

DATA_DIR_ENV = 'REVERSE_SD_DATA_DIR'


def default_data_dir() -> pathlib.Path:
  """$REVERSE_SD_DATA_DIR, else ~/.cache/reverse_sd/data."""
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return pathlib.Path(env)
  return pathlib.Path.home() / '.cache' / 'reverse_sd' / 'data'


def resolve_data_dir(data_config: ml_collections.ConfigDict) -> pathlib.Path:
  """The data folder of the config; it may not exist yet (it is built)."""
  path = (pathlib.Path(data_config.data_dir).expanduser()
          if data_config.data_dir else default_data_dir())
  if path.exists() and not path.is_dir():
    raise ValueError(f'config.data.data_dir={str(path)!r} is a file, not a '
                     'folder.')
  return path


# config.data fields passed to each real-data builder (reverse_sd.data.build).
_COMMON_OPTIONS = ('image_size', 'resize_mode', 'image_format',
                   'validation_fraction', 'test_fraction', 'split_seed',
                   'dedup', 'num_workers')
_BUILD_OPTIONS = {
    'diffusiondb': _COMMON_OPTIONS + ('collection', 'parts', 'max_image_nsfw',
                                      'max_prompt_nsfw'),
    'image_folder': _COMMON_OPTIONS + ('prompts',),
}


def image_fn(data_config: ml_collections.ConfigDict):
  """The read-time image transform: CLIP's resize + centre crop to
  `input_size`, or None to feed images as stored."""
  size = data_config.get('input_size', 0)
  if not size:
    return None
  return functools.partial(preprocess.clip_preprocess, size=int(size))


def open_builder(data_config: ml_collections.ConfigDict):
  """Returns a prepared TFDS builder for `data_config.name`."""
  data_dir = resolve_data_dir(data_config)
  if data_config.name == 'synthetic':
    # Imported here: TFDS builders register on import, and only this path
    # needs this one.
    from reverse_sd.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.build(
        data_dir, seed=data_config.seed, image_size=data_config.image_size,
        num_train=data_config.num_train,
        num_validation=data_config.num_validation,
        num_test=data_config.num_test,
        num_test_shifted=data_config.num_test_shifted,
        max_objects=data_config.get('max_objects',
                                    synthetic.grammar.MAX_OBJECTS))
  if data_config.name == 'generated':
    name = data_config.get('generated_name', '')
    if not name:
      raise ValueError(
          "config.data.generated_name is empty: data set 'generated' (the "
          "generator's images for the synthetic prompts) is made by "
          '`python -m reverse_sd.loop`; set generated_name to the config name '
          'it prints.')
    # Imported here: TFDS builders register on import, and only this path
    # needs this one.
    from reverse_sd.data import generated  # pylint: disable=g-import-not-at-top
    return generated.open_prepared(data_dir, name)
  if data_config.name in _BUILD_OPTIONS:
    # Imported here: the builders pull in tensorflow_datasets (tensorflow).
    from reverse_sd.data import build  # pylint: disable=g-import-not-at-top
    build_fn = {'diffusiondb': build.build_diffusiondb,
                'image_folder': build.build_image_folder}[data_config.name]
    options = {key: data_config[key] for key in _BUILD_OPTIONS[data_config.name]
               if key in data_config}
    if options.get('prompts') == '':
      options['prompts'] = None  # The builder looks for its default files.
    if not data_config.get('manual_dir'):
      raise ValueError(
          f'config.data.manual_dir is empty: data set {data_config.name!r} is '
          'built from files you downloaded; set it to their folder (see '
          'README.md: Real data).')
    return build_fn(data_dir, data_config.manual_dir, **options)
  raise ValueError(f'config.data.name={data_config.name!r}; expected one of '
                   f"{['synthetic', 'generated', *_BUILD_OPTIONS]}.")


def _make_encoder(text_config: ml_collections.ConfigDict):
  # Imported here: the MiniLM encoder (flax, tokenizers) runs only when
  # targets are missing from the cache.
  from reverse_sd.text import minilm  # pylint: disable=g-import-not-at-top
  return minilm.SentenceEncoder(text_config.model_dir or None,
                                batch_size=text_config.batch_size)


def load_splits(config: ml_collections.ConfigDict,
                splits: Sequence[str]) -> dict[str, pipeline.SplitData]:
  """Opens `splits` (building the data set and targets on first use)."""
  builder = open_builder(config.data)
  known = set(builder.info.splits.keys())
  missing = [s for s in splits if s not in known]
  if missing:
    raise ValueError(f'Split(s) {missing} are not in data set '
                     f'{builder.info.full_name} at {builder.data_dir}; it has '
                     f'{sorted(known)}.')
  encoder = []  # Made on first use, shared by all splits of this load.

  def encoder_factory():
    if not encoder:
      encoder.append(_make_encoder(config.text))
    return encoder[0]

  out = {}
  for split in splits:
    table = targets_lib.load_or_compute(builder, split,
                                        encoder_factory=encoder_factory)
    source = builder.as_data_source(split)
    out[split] = pipeline.SplitData(split, source, table,
                                    image_fn=image_fn(config.data))
  return out
