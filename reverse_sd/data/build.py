r"""Builds a real-data TFDS data set from downloaded files, and reports on it.

  python -m reverse_sd.data.build diffusiondb --manual_dir=DIR \
      --data_dir=OUT [--collection=2m|large] [--parts=1-200] \
      [--image_size=256] [--resize_mode=center_crop|keep_aspect] \
      [--max_image_nsfw=0.5] [--num_workers=8] ...
  python -m reverse_sd.data.build image_folder --manual_dir=DIR \
      --data_dir=OUT [--prompts=prompts.csv|prompts.jsonl] ...

Prints the examples per split, the skipped counts and the path of
build_report.json. A second run with the same options only checks the files.
From Python, `build_diffusiondb` / `build_image_folder` return the prepared
builder.
"""

from collections.abc import Callable, Sequence
import inspect
import os
from typing import Any

from absl import app
from absl import flags

from reverse_sd import cli
from reverse_sd.data import build_common
from reverse_sd.data import diffusiondb
from reverse_sd.data import image_folder


def _checked(build_fn: Callable[..., Any], what: str,
             options: dict[str, Any]) -> None:
  known = [name for name, parameter in
           inspect.signature(build_fn).parameters.items()
           if parameter.kind == parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ValueError(f'Unknown {what} option(s) {unknown}; known: {known}.')


def build_diffusiondb(data_dir: os.PathLike[str] | str,
                      manual_dir: os.PathLike[str] | str,
                      **options: Any) -> diffusiondb.DiffusionDB:
  """Prepared DiffusionDB builder; options as for `diffusiondb.build`."""
  _checked(diffusiondb.build, 'diffusiondb', options)
  return diffusiondb.build(data_dir, manual_dir, **options)


def build_image_folder(data_dir: os.PathLike[str] | str,
                       manual_dir: os.PathLike[str] | str,
                       **options: Any) -> image_folder.PromptImageFolder:
  """Prepared image-folder builder; options as for `image_folder.build`."""
  _checked(image_folder.build, 'image_folder', options)
  return image_folder.build(data_dir, manual_dir, **options)


BUILDERS: dict[str, Callable[..., Any]] = {
    'diffusiondb': build_diffusiondb,
    'image_folder': build_image_folder,
}

_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Folder with the downloaded files.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'TFDS data folder to build into.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 256, 'Stored image side.')
_RESIZE_MODE = flags.DEFINE_enum(
    'resize_mode', 'center_crop', ['center_crop', 'keep_aspect'],
    'Shorter side to size and crop, or longer side to size and pad.')
_IMAGE_FORMAT = flags.DEFINE_enum(
    'image_format', 'png', ['png', 'jpeg'], 'Encoding of stored images.')
_VALIDATION_FRACTION = flags.DEFINE_float(
    'validation_fraction', 0.05, 'Share of prompts in validation.')
_TEST_FRACTION = flags.DEFINE_float(
    'test_fraction', 0.05, 'Share of prompts in test.')
_SPLIT_SEED = flags.DEFINE_integer('split_seed', 0, 'Salts the split hash.')
_DEDUP = flags.DEFINE_boolean(
    'dedup', True, 'Drop byte-identical images but the first.')
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', os.cpu_count() or 1, 'Image decoding threads.')
_COLLECTION = flags.DEFINE_enum(
    'collection', '2m', list(diffusiondb.COLLECTIONS),
    'diffusiondb: 2M (PNG) or Large (WebP).')
_PARTS = flags.DEFINE_string(
    'parts', 'all', "diffusiondb: 'all', '1-200', '1,5,7-9'.")
_MAX_IMAGE_NSFW = flags.DEFINE_float(
    'max_image_nsfw', None, 'diffusiondb: drop images scored above this '
    '(needs the metadata parquet).')
_MAX_PROMPT_NSFW = flags.DEFINE_float(
    'max_prompt_nsfw', None, 'diffusiondb: drop prompts scored above this.')
_PROMPTS = flags.DEFINE_string(
    'prompts', None, 'image_folder: prompts.csv or prompts.jsonl (relative '
    'to manual_dir); default: whichever exists.')


def _options(command: str) -> dict[str, Any]:
  options = dict(
      image_size=_IMAGE_SIZE.value, resize_mode=_RESIZE_MODE.value,
      image_format=_IMAGE_FORMAT.value,
      validation_fraction=_VALIDATION_FRACTION.value,
      test_fraction=_TEST_FRACTION.value, split_seed=_SPLIT_SEED.value,
      dedup=_DEDUP.value, num_workers=_NUM_WORKERS.value)
  if command == 'diffusiondb':
    options.update(collection=_COLLECTION.value, parts=_PARTS.value,
                   max_image_nsfw=_MAX_IMAGE_NSFW.value,
                   max_prompt_nsfw=_MAX_PROMPT_NSFW.value)
  else:
    options.update(prompts=_PROMPTS.value)
  return options


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in BUILDERS:
    raise app.UsageError(f'Expected one command, one of {sorted(BUILDERS)}; '
                         f'got {argv[1:]}.')
  if not _MANUAL_DIR.value or not _DATA_DIR.value:
    raise app.UsageError('--manual_dir and --data_dir are required.')
  command = argv[1]
  try:
    builder = BUILDERS[command](_DATA_DIR.value, _MANUAL_DIR.value,
                                **_options(command))
  except (OSError, ValueError, build_common.BrokenBuildError) as error:
    # Bad input: the message says what to fix; a traceback would bury it.
    raise SystemExit(f'error: {type(error).__name__}: {error}') from error
  print(build_common.report_summary(build_common.read_report(builder)))
  print('Report:', os.path.join(os.fspath(builder.data_path),
                                build_common.REPORT_NAME))


if __name__ == '__main__':
  cli.run(main)
