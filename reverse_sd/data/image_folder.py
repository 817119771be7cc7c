"""A folder of images with their prompts, as a TFDS builder.

Two list formats, in `manual_dir`:

  prompts.csv    columns imgId,prompt (the Kaggle "Stable Diffusion - Image
                 to Prompts" format; other columns are ignored). The image of
                 row imgId is <imgId>.<ext> in manual_dir/images/ or
                 manual_dir/, with ext any of build_common.IMAGE_EXTENSIONS.
  prompts.jsonl  one {"image": path, "prompt": text} per line; relative
                 paths are relative to manual_dir.

    builder = image_folder.build(data_dir, manual_dir)
    source = builder.as_data_source('train')

Features: `id` (the imgId, or the "image" value of the JSON line),
`image` (image_size x image_size x 3) and `prompt`. Resizing, splitting by
prompt, deduplication and the build report are as for DiffusionDB
(`build_common`). The config is named after a hash of the list file, so
another folder never reuses a build.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from reverse_sd.data import build_common
from reverse_sd.data.build_common import Candidate

BrokenBuildError = build_common.BrokenBuildError  # What a bad build raises.

DEFAULT_PROMPT_FILES: tuple[str, ...] = ('prompts.csv', 'prompts.jsonl')
CSV_COLUMNS: tuple[str, ...] = ('imgId', 'prompt')
IMAGE_SUBFOLDER = 'images'
EXPECTED_LAYOUT = (
    'prompts.csv (columns imgId,prompt) with images <imgId>.png (or .jpg, '
    '.webp, ...) in images/ or beside it; or prompts.jsonl with lines '
    '{"image": "relative/or/absolute/path.png", "prompt": "..."}.')


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(build_common.PromptImageConfig):
  """The list file (path and content hash) and the shared options."""

  prompts: str = ''  # Absolute path of prompts.csv / prompts.jsonl.
  prompts_sha256: str = ''


def resolve_prompts_file(manual_dir: epath.Path,
                         prompts: str | None = None) -> epath.Path:
  """The list file: `prompts` (relative to manual_dir) or the default."""
  if prompts:
    path = epath.Path(os.path.expanduser(prompts))
    path = path if path.is_absolute() else manual_dir / path
    if not path.is_file():
      raise FileNotFoundError(f'prompts file {os.fspath(path)} does not '
                              f'exist. Expected in {os.fspath(manual_dir)}: '
                              f'{EXPECTED_LAYOUT}')
  else:
    found = [manual_dir / n for n in DEFAULT_PROMPT_FILES
             if (manual_dir / n).is_file()]
    if not found:
      raise FileNotFoundError(
          f'manual_dir {os.fspath(manual_dir)} has neither '
          f'{" nor ".join(DEFAULT_PROMPT_FILES)}. Expected: '
          f'{EXPECTED_LAYOUT}')
    path = found[0]
  if _list_format(path) is None:
    raise ValueError(f'prompts file {os.fspath(path)}: expected a .csv or '
                     '.jsonl file.')
  return path


def _list_format(path: epath.Path) -> str | None:
  return {'.csv': 'csv', '.jsonl': 'jsonl', '.json': 'jsonl'}.get(
      path.suffix.lower())


def config_name(options: dict[str, Any]) -> str:
  """E.g. 'prompts-1a2b3c4d5e_256px_crop_png_v0.05_t0.05_s0_dedup'."""
  stem = epath.Path(options['prompts']).stem[:40]
  return build_common.safe_name(
      f'{stem}-{options["prompts_sha256"][:10]}_'
      f'{build_common.common_name(options)}')


def make_config(*, prompts: os.PathLike[str] | str, image_size: int = 256,
                resize_mode: str = 'center_crop', image_format: str = 'png',
                validation_fraction: float = 0.05, test_fraction: float = 0.05,
                split_seed: int = 0, dedup: bool = True) -> ImageFolderConfig:
  """Validates the options, hashes the list file, names the config."""
  options = build_common.check_common_options(
      image_size=image_size, resize_mode=resize_mode,
      image_format=image_format, validation_fraction=validation_fraction,
      test_fraction=test_fraction, split_seed=split_seed, dedup=dedup)
  path = os.path.abspath(os.fspath(prompts))
  with open(path, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  options.update(prompts=path, prompts_sha256=digest)
  return ImageFolderConfig(name=config_name(options), **options)


def _image_index(manual_dir: epath.Path) -> dict[str, list[str]]:
  """File stem -> image paths in manual_dir/images then manual_dir."""
  index: dict[str, list[str]] = {}
  rank = {ext: i for i, ext in enumerate(build_common.IMAGE_EXTENSIONS)}
  for folder in (manual_dir / IMAGE_SUBFOLDER, manual_dir):
    if not folder.is_dir():
      continue
    entries = sorted(
        (e for e in os.scandir(os.fspath(folder)) if e.is_file() and
         os.path.splitext(e.name)[1].lower() in rank),
        key=lambda e: (rank[os.path.splitext(e.name)[1].lower()], e.name))
    for entry in entries:
      index.setdefault(os.path.splitext(entry.name)[0], []).append(entry.path)
  return index


class PromptImageFolder(build_common.PromptImageBuilder,
                        skip_registration=True):
  """Images and prompts from a folder; see the module docstring.

  Not in TFDS's global registry: construct it directly or call `build()`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put in manual_dir: ' + EXPECTED_LAYOUT

  def _report_header(self) -> dict[str, Any]:
    return {'prompts_file': self.builder_config.prompts,
            'prompts_sha256': self.builder_config.prompts_sha256}

  def _scan(self, manual_dir: epath.Path,
            report: build_common.BuildReport) -> list[Candidate]:
    path = epath.Path(self.builder_config.prompts)
    if _list_format(path) == 'csv':
      return _scan_csv(manual_dir, path, report)
    return _scan_jsonl(manual_dir, path, report)


def _candidate(image_id: str, prompt: str, path: str) -> Candidate:
  return Candidate(id=image_id, prompt=prompt, path=path,
                   num_bytes=os.path.getsize(path))


def _scan_csv(manual_dir: epath.Path, csv_path: epath.Path,
              report: build_common.BuildReport) -> list[Candidate]:
  """Rows of prompts.csv whose image exists; unlisted images are reported."""
  index = _image_index(manual_dir)
  candidates, line_of_id = [], {}
  with open(os.fspath(csv_path), newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f'{os.fspath(csv_path)}: columns {missing} are '
                       f'missing (header: {reader.fieldnames}); expected '
                       f'columns {list(CSV_COLUMNS)}.')
    for row in reader:
      where = f'{os.fspath(csv_path)}:{reader.line_num}'
      image_id, prompt = (row.get('imgId') or '').strip(), row.get('prompt')
      if not image_id:
        report.skip(where, 'bad_row', 'imgId is empty')
      elif image_id in line_of_id:
        report.skip(where, 'duplicate_id', f'imgId {image_id!r} is also on '
                    f'line {line_of_id[image_id]}')
      elif not isinstance(prompt, str) or not prompt.strip():
        line_of_id[image_id] = reader.line_num
        report.skip(where, 'empty_prompt', f'imgId {image_id!r} has no prompt')
      elif image_id not in index:
        line_of_id[image_id] = reader.line_num
        report.skip(where, 'missing_image', f'no image {image_id}.<ext> in '
                    f'{os.fspath(manual_dir / IMAGE_SUBFOLDER)} or '
                    f'{os.fspath(manual_dir)}')
      else:
        line_of_id[image_id] = reader.line_num
        paths = index[image_id]
        if len(paths) > 1:
          report.warn('ambiguous_image', f'{image_id}: used {paths[0]}, '
                      f'ignored {paths[1:]}')
        candidates.append(_candidate(image_id, prompt, paths[0]))
  for stem, paths in sorted(index.items()):
    if stem not in line_of_id:
      report.skip(paths[0], 'no_prompt',
                  f'image is not listed in {csv_path.name}')
  return candidates


def _scan_jsonl(manual_dir: epath.Path, jsonl_path: epath.Path,
                report: build_common.BuildReport) -> list[Candidate]:
  """Lines of prompts.jsonl whose image exists."""
  candidates, line_of_id = [], {}
  with open(os.fspath(jsonl_path), encoding='utf-8-sig') as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{os.fspath(jsonl_path)}:{line_number}'
      try:
        entry = json.loads(line)
      except ValueError as error:
        report.skip(where, 'bad_json_entry', f'line does not parse ({error})')
        continue
      problem = _jsonl_problem(entry)
      if problem:
        report.skip(where, *problem)
        continue
      image, prompt = entry['image'], entry['prompt']
      path = os.path.join(os.fspath(manual_dir), os.path.expanduser(image))
      if image in line_of_id:
        report.skip(where, 'duplicate_id', f'image {image!r} is also on line '
                    f'{line_of_id[image]}')
        continue
      line_of_id[image] = line_number
      if not os.path.isfile(path):
        report.skip(where, 'missing_image', f'{path} does not exist')
        continue
      candidates.append(_candidate(image, prompt, path))
  return candidates


def _jsonl_problem(entry: Any) -> tuple[str, str] | None:
  if not isinstance(entry, dict):
    return 'bad_json_entry', (f'a JSON {type(entry).__name__}, not an object '
                              'with "image" and "prompt"')
  for key in ('image', 'prompt'):
    if key not in entry:
      return 'bad_json_entry', f'no {key!r} key'
    if not isinstance(entry[key], str):
      return 'bad_json_entry', (f'{key!r} is a {type(entry[key]).__name__}, '
                                'not a string')
  if not entry['image'].strip():
    return 'bad_json_entry', "'image' is empty"
  if not entry['prompt'].strip():
    return 'empty_prompt', f'{entry["image"]!r} has no prompt'
  return None


def build(data_dir: os.PathLike[str] | str,
          manual_dir: os.PathLike[str] | str, *, prompts: str | None = None,
          image_size: int = 256, resize_mode: str = 'center_crop',
          image_format: str = 'png', validation_fraction: float = 0.05,
          test_fraction: float = 0.05, split_seed: int = 0,
          dedup: bool = True, num_workers: int = 1,
          progress: bool = True) -> PromptImageFolder:
  """Builds the folder's data set under `data_dir` unless it is there.

  Args:
    data_dir: the TFDS data folder (the data set goes in
      data_dir/prompt_image_folder/<config name>/1.0.0).
    manual_dir: the folder (see the module docstring).
    prompts: the list file, relative to manual_dir or absolute; default
      prompts.csv, else prompts.jsonl.
    image_size, resize_mode, image_format, validation_fraction,
    test_fraction, split_seed, dedup, num_workers, progress: as for
      `diffusiondb.build`.

  Returns:
    The prepared builder; build_report.json is in `builder.data_path`.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  manual = build_common.check_manual_dir(manual_dir, EXPECTED_LAYOUT)
  config = make_config(
      prompts=resolve_prompts_file(manual, prompts), image_size=image_size,
      resize_mode=resize_mode, image_format=image_format,
      validation_fraction=validation_fraction, test_fraction=test_fraction,
      split_seed=split_seed, dedup=dedup)
  builder = build_common.open_builder(PromptImageFolder, data_dir, config)
  return build_common.prepare(builder, manual, num_workers=num_workers,
                              progress=progress)
