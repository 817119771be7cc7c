"""DiffusionDB (2M or Large) as a TFDS builder, from files you downloaded.

Nothing is downloaded: put the parts (zips or unzipped folders) in a
`manual_dir` laid out as on https://huggingface.co/datasets/poloclub/diffusiondb

    images/part-000001.zip  or  images/part-000001/     (2M: <uuid>.png)
    diffusiondb-large-part-1/part-000001[.zip]          (Large: <uuid>.webp)
    diffusiondb-large-part-2/part-010001[.zip]
    metadata.parquet, metadata-large.parquet            (optional)

Each part holds ~1000 images and `part-NNNNNN.json`, mapping an image's file
name to {"p": prompt, "se": seed, "c": cfg, "st": steps, "sa": sampler}.

    builder = diffusiondb.build(data_dir, manual_dir, parts='1-200')
    source = builder.as_data_source('train')

Images are resized to image_size x image_size (`preprocess.resize_and_crop`)
and stored as PNG (or JPEG). Splits are by prompt (`build_common`). The JSON
prompt is the label; the metadata parquet, when present, supplies the NSFW
scores for the optional filters and is cross-checked (differences are
counted in the report). Unreadable parts, images and entries are skipped and
listed in build_report.json beside the data.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any
import zipfile

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from reverse_sd.data import build_common
from reverse_sd.data.build_common import Candidate

BrokenBuildError = build_common.BrokenBuildError  # What a bad build raises.

COLLECTIONS: tuple[str, ...] = ('2m', 'large')
NUM_PARTS: dict[str, int] = {'2m': 2000, 'large': 14000}
METADATA_FILES: dict[str, str] = {'2m': 'metadata.parquet',
                                  'large': 'metadata-large.parquet'}
METADATA_COLUMNS: tuple[str, ...] = (
    'image_name', 'prompt', 'part_id', 'seed', 'step', 'cfg', 'sampler',
    'width', 'height', 'user_name', 'timestamp', 'image_nsfw', 'prompt_nsfw')
# The integer codes of metadata.parquet's `sampler` column.
SAMPLERS: dict[int, str] = {
    1: 'ddim', 2: 'plms', 3: 'k_euler', 4: 'k_euler_ancestral', 5: 'k_heun',
    6: 'k_dpm_2', 7: 'k_dpm_2_ancestral', 8: 'k_lms', 9: 'others'}
EXPECTED_LAYOUT: dict[str, str] = {
    '2m': ('DiffusionDB 2M parts as images/part-000001.zip (or the unzipped '
           'folder images/part-000001/ with <uuid>.png files and '
           'part-000001.json), optionally metadata.parquet.'),
    'large': ('DiffusionDB Large parts as '
              'diffusiondb-large-part-1/part-000001.zip (or the unzipped '
              'folder, with <uuid>.webp files and part-000001.json) and '
              'diffusiondb-large-part-2/..., optionally '
              'metadata-large.parquet.'),
}
_PART_NAME = re.compile(r'^part-(\d{6})(\.zip)?$')
_MAX_PARTS_IN_NAME = 60  # Characters; a longer part list is hashed.


# ------------------------------------------------------------------ config --


def parse_parts(spec: str | int | Iterable[int], collection: str = '2m'
                ) -> tuple[int, ...] | None:
  """'1-200', '1,5,7-9', 7 or [1, 2] -> sorted part numbers; 'all' -> None."""
  top = NUM_PARTS[collection]
  if isinstance(spec, str) and spec.strip().lower() == 'all':
    return None
  if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
    numbers = {int(spec)}
  elif isinstance(spec, str):
    numbers = set()
    for piece in spec.replace('+', ',').split(','):
      match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', piece)
      if not match:
        raise ValueError(f"parts={spec!r}: cannot read {piece!r}; expected "
                         "'all' or numbers and ranges like '1-200' or "
                         "'1,5,7-9'.")
      low = int(match.group(1))
      high = int(match.group(2) or low)
      if high < low:
        raise ValueError(f'parts={spec!r}: range {piece!r} is empty.')
      numbers.update(range(low, high + 1))
  else:
    try:
      numbers = {int(n) for n in spec}
    except (TypeError, ValueError) as error:
      raise ValueError(f'parts={spec!r}: expected a string like "1-200", an '
                       'integer or a list of integers.') from error
  bad = sorted(n for n in numbers if not 1 <= n <= top)
  if bad or not numbers:
    raise ValueError(f'parts={spec!r}: DiffusionDB {collection} has parts 1 '
                     f'to {top}; got {bad[:10] or "none"}.')
  return tuple(sorted(numbers))


def format_parts(parts: Iterable[int]) -> str:
  """Sorted part numbers as ranges joined by '+', e.g. '1-3+7+9-12'."""
  ranges, parts = [], sorted(set(parts))
  for part in parts:
    if ranges and part == ranges[-1][1] + 1:
      ranges[-1][1] = part
    else:
      ranges.append([part, part])
  return '+'.join(f'{a}' if a == b else f'{a}-{b}' for a, b in ranges)


@dataclasses.dataclass(eq=False)
class DiffusionDBConfig(build_common.PromptImageConfig):
  """The collection, parts, filters and shared options; named after them."""

  collection: str = '2m'
  parts: str = '1-2000'  # `format_parts` form.
  max_image_nsfw: float | None = None
  max_prompt_nsfw: float | None = None

  @property
  def part_numbers(self) -> tuple[int, ...]:
    return parse_parts(self.parts, self.collection)


def config_name(options: dict[str, Any]) -> str:
  """E.g. '2m_p1-200_256px_crop_png_v0.05_t0.05_s0_dedup_insfw0.5'."""
  parts = options['parts']
  if len(parts) > _MAX_PARTS_IN_NAME:
    parts = 'h' + hashlib.sha256(parts.encode()).hexdigest()[:12]
  name = f'{options["collection"]}_p{parts}_{build_common.common_name(options)}'
  if options['max_image_nsfw'] is not None:
    name += f'_insfw{options["max_image_nsfw"]:g}'
  if options['max_prompt_nsfw'] is not None:
    name += f'_pnsfw{options["max_prompt_nsfw"]:g}'
  return build_common.safe_name(name)


def _threshold(key: str, value: float | None) -> float | None:
  """The threshold, or None (no filter) for None or a negative number."""
  if value is None:
    return None
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise ValueError(f'{key} must be None or a number (DiffusionDB scores '
                     f'are in [0, 1]; < 0 means no filter), got {value!r}')
  return None if value < 0 else float(value)


def make_config(*, collection: str = '2m', parts: str | Iterable[int],
                image_size: int = 256, resize_mode: str = 'center_crop',
                image_format: str = 'png', validation_fraction: float = 0.05,
                test_fraction: float = 0.05, split_seed: int = 0,
                dedup: bool = True, max_image_nsfw: float | None = None,
                max_prompt_nsfw: float | None = None) -> DiffusionDBConfig:
  """Validates the options and returns the config named after them."""
  if collection not in COLLECTIONS:
    raise ValueError(f'collection must be one of {COLLECTIONS}, got '
                     f'{collection!r}')
  numbers = parse_parts(parts, collection)
  if numbers is None:
    raise ValueError("make_config needs explicit parts; build() resolves "
                     "parts='all' against manual_dir.")
  options = build_common.check_common_options(
      image_size=image_size, resize_mode=resize_mode,
      image_format=image_format, validation_fraction=validation_fraction,
      test_fraction=test_fraction, split_seed=split_seed, dedup=dedup)
  options.update(collection=collection, parts=format_parts(numbers),
                 max_image_nsfw=_threshold('max_image_nsfw', max_image_nsfw),
                 max_prompt_nsfw=_threshold('max_prompt_nsfw',
                                            max_prompt_nsfw))
  return DiffusionDBConfig(name=config_name(options), **options)


# ------------------------------------------------------------------- parts --


def part_folders(manual_dir: epath.Path, collection: str) -> list[epath.Path]:
  """Where the parts of `collection` are looked for, in preference order."""
  if collection == '2m':
    return [manual_dir / 'images']
  return sorted((p for p in manual_dir.glob('diffusiondb-large-part-*')
                 if p.is_dir()), key=lambda p: p.name)


def find_parts(manual_dir: epath.Path,
               collection: str) -> dict[int, list[epath.Path]]:
  """Part number -> its zip and/or folder(s) found in `manual_dir`."""
  found: dict[int, list[epath.Path]] = {}
  for folder in part_folders(manual_dir, collection):
    if not folder.is_dir():
      continue
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
      match = _PART_NAME.match(path.name)
      if match and (path.is_dir() or path.is_file()):
        found.setdefault(int(match.group(1)), []).append(path)
  for paths in found.values():  # Zips first: a folder may be half extracted.
    paths.sort(key=lambda p: (p.suffix != '.zip', os.fspath(p)))
  return found


@dataclasses.dataclass
class _Part:
  """A readable part: its JSON entries and its images by file name."""
  number: int
  path: epath.Path
  entries: dict[str, Any]
  images: dict[str, tuple[str | None, int, int | None]]  # member, size, crc

  def location(self, name: str) -> str:
    member = self.images.get(name, (None,))[0]
    if self.path.suffix == '.zip':
      return f'{os.fspath(self.path)}:{member or name}'
    return os.fspath(self.path / name)


def _is_image_name(name: str) -> bool:
  base = name.rsplit('/', 1)[-1]
  return (not base.startswith('.') and not name.startswith('__MACOSX/') and
          base.lower().endswith(build_common.IMAGE_EXTENSIONS))


def _open_part(number: int, path: epath.Path,
               report: build_common.BuildReport) -> _Part | None:
  """Lists a part's images and parses its JSON; None (reported) if it can't."""
  json_name = f'part-{number:06d}.json'
  images: dict[str, tuple[str | None, int, int | None]] = {}
  json_bytes = None
  try:
    if path.suffix == '.zip':
      with zipfile.ZipFile(os.fspath(path)) as archive:
        for info in archive.infolist():
          base = info.filename.rsplit('/', 1)[-1]
          if info.is_dir():
            continue
          if base == json_name:
            json_bytes = archive.read(info)
          elif _is_image_name(info.filename):
            images.setdefault(base, (info.filename, info.file_size,
                                     info.CRC))
    else:
      for entry in sorted(os.scandir(os.fspath(path)), key=lambda e: e.name):
        if entry.name == json_name:
          with open(entry.path, 'rb') as f:
            json_bytes = f.read()
        elif entry.is_file() and _is_image_name(entry.name):
          images[entry.name] = (None, entry.stat().st_size, None)
  except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile) as error:
    report.skip_part(os.fspath(path), 'unreadable_part',
                     f'{type(error).__name__}: {error}')
    return None
  if json_bytes is None:
    report.skip_part(os.fspath(path), 'missing_part_json',
                     f'no {json_name} in the part ({len(images)} images)')
    return None
  try:
    entries = json.loads(json_bytes)
  except ValueError as error:  # UnicodeDecodeError is a ValueError too.
    report.skip_part(f'{os.fspath(path)}:{json_name}', 'bad_part_json',
                     f'does not parse ({error}); {len(images)} images '
                     'skipped with it')
    return None
  if not isinstance(entries, dict):
    report.skip_part(f'{os.fspath(path)}:{json_name}', 'bad_part_json',
                     f'is a JSON {type(entries).__name__}, not an object '
                     f'mapping file names to entries; {len(images)} images '
                     'skipped with it')
    return None
  return _Part(number, path, entries, images)


# ----------------------------------------------------------------- entries --


def _parse_entry(entry: Any, report: build_common.BuildReport, where: str
                 ) -> tuple[str, dict[str, Any]] | tuple[None, tuple[str, str]]:
  """(prompt, features), or (None, (reason, detail)) for a bad entry."""
  if not isinstance(entry, dict):
    return None, ('bad_json_entry',
                  f'entry is a JSON {type(entry).__name__}, not an object')
  if 'p' not in entry:
    return None, ('bad_json_entry', "entry has no 'p' (prompt)")
  prompt = entry['p']
  if not isinstance(prompt, str):
    return None, ('bad_json_entry',
                  f"'p' is a {type(prompt).__name__}, not a string: "
                  f'{prompt!r:.80}')
  if not prompt.strip():
    return None, ('empty_prompt', "'p' is empty")

  def number(key, cast, default):
    value = entry.get(key)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value) and (cast is float or float(value).is_integer()))
    if not ok:
      report.warn(f'defaulted_{key}', f'{where}: {key}={value!r} -> {default}')
      return default
    return cast(value)

  sampler = entry.get('sa')
  if isinstance(sampler, int) and not isinstance(sampler, bool):
    sampler = SAMPLERS.get(sampler, str(sampler))
  if not isinstance(sampler, str):
    report.warn('defaulted_sa', f"{where}: sa={sampler!r} -> ''")
    sampler = ''
  return prompt, {'seed': number('se', int, -1),
                  'cfg': np.float32(number('c', float, -1.0)),
                  'steps': number('st', int, -1), 'sampler': sampler}


class _Metadata:
  """metadata.parquet rows of the selected parts, served part by part."""

  def __init__(self, path: epath.Path, parts: Iterable[int]):
    # Imported here: pyarrow is needed only to build DiffusionDB.
    # pylint: disable-next=g-import-not-at-top
    import pyarrow.parquet as pq
    self.path = os.fspath(path)
    needed = ('image_name', 'part_id', 'prompt', 'image_nsfw', 'prompt_nsfw')
    try:
      names = pq.read_schema(self.path).names
      missing = [c for c in needed if c not in names]
      if missing:
        raise ValueError(f'{self.path}: columns {missing} are missing (found '
                         f'{names}); expected the DiffusionDB metadata '
                         f'columns {list(METADATA_COLUMNS)}.')
      table = pq.read_table(self.path, columns=list(needed),
                            filters=[('part_id', 'in', sorted(set(parts)))])
    except ValueError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f'{self.path}: cannot be read as parquet '
                       f'({type(error).__name__}: {error}).') from error
    self._table = table
    part_ids = np.asarray(table.column('part_id').to_numpy(
        zero_copy_only=False), np.int64)
    self._order = np.argsort(part_ids, kind='stable')
    sorted_ids = part_ids[self._order]
    self._bounds = {}
    for part in np.unique(sorted_ids):
      self._bounds[int(part)] = (
          int(np.searchsorted(sorted_ids, part, 'left')),
          int(np.searchsorted(sorted_ids, part, 'right')))

  def for_part(self, part: int) -> dict[str, tuple[Any, Any, Any]]:
    """image_name -> (prompt, image_nsfw, prompt_nsfw) for one part."""
    if part not in self._bounds:
      return {}
    low, high = self._bounds[part]
    rows = self._table.take(self._order[low:high]).to_pydict()
    return {name: (prompt, image_nsfw, prompt_nsfw)
            for name, prompt, image_nsfw, prompt_nsfw in zip(
                rows['image_name'], rows['prompt'], rows['image_nsfw'],
                rows['prompt_nsfw'])}


def _nsfw_filter(scores: tuple[Any, Any] | None, thresholds: dict[str, float],
                 report: build_common.BuildReport, where: str
                 ) -> tuple[str, str] | None:
  """(reason, detail) if a score is above its threshold, else None."""
  for (key, threshold), score in zip(thresholds.items(),
                                     scores or (None, None)):
    if threshold is None:
      continue
    if (score is None or not isinstance(score, (int, float)) or
        math.isnan(score) or score < 0):
      report.warn('nsfw_unscored', f'{where}: no {key} score; kept')
      continue
    if score > threshold:
      return key, f'{key} score {score:.3g} > {threshold:g}'
  return None


# ----------------------------------------------------------------- builder --


class DiffusionDB(build_common.PromptImageBuilder, skip_registration=True):
  """DiffusionDB prompt/image pairs, resized; see the module docstring.

  Not in TFDS's global registry: construct it directly or call `build()`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download DiffusionDB parts from '
      'https://huggingface.co/datasets/poloclub/diffusiondb into manual_dir: '
      + EXPECTED_LAYOUT['2m'] + ' Or: ' + EXPECTED_LAYOUT['large'])

  def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {
        'seed': tfds.features.Scalar(dtype=np.int64),
        'cfg': tfds.features.Scalar(dtype=np.float32),
        'steps': tfds.features.Scalar(dtype=np.int32),
        'sampler': tfds.features.Text(),
        'part': tfds.features.Scalar(dtype=np.int32),
    }

  def _report_header(self) -> dict[str, Any]:
    config = self.builder_config
    return {'collection': config.collection, 'parts': config.parts,
            'max_image_nsfw': config.max_image_nsfw,
            'max_prompt_nsfw': config.max_prompt_nsfw,
            'metadata_file': self._metadata_file}

  def _scan(self, manual_dir: epath.Path,
            report: build_common.BuildReport) -> list[Candidate]:
    config = self.builder_config
    found = find_parts(manual_dir, config.collection)
    selected = config.part_numbers
    _check_parts_present(manual_dir, config.collection, selected, found)
    metadata_path = manual_dir / METADATA_FILES[config.collection]
    thresholds = {'image_nsfw': config.max_image_nsfw,
                  'prompt_nsfw': config.max_prompt_nsfw}
    if any(t is not None for t in thresholds.values()):
      _check_metadata_present(metadata_path)
    metadata = (_Metadata(metadata_path, selected)
                if metadata_path.exists() else None)
    self._metadata_file = os.fspath(metadata_path) if metadata else None
    candidates = []
    for number in selected:
      if len(found[number]) > 1:
        report.warn('part_in_two_forms', f'part {number}: used '
                    f'{found[number][0]}, ignored {found[number][1:]}')
      part = _open_part(number, found[number][0], report)
      if part is not None:
        meta = metadata.for_part(number) if metadata else None
        candidates.extend(self._part_candidates(part, meta, thresholds,
                                                report))
    report.stats['parts_read'] = len(selected) - len(report.skipped_parts)
    return candidates

  def _part_candidates(self, part: _Part, meta: dict[str, Any] | None,
                       thresholds: dict[str, float | None],
                       report: build_common.BuildReport) -> list[Candidate]:
    json_name = f'part-{part.number:06d}.json'
    part_path = os.fspath(part.path)  # One string shared by the part.
    candidates = []
    for name in sorted(set(part.entries) | set(part.images)):
      where = part.location(name)
      if name not in part.images:
        report.skip(where, 'missing_image',
                    f'listed in {json_name} but not in the part')
        continue
      if name not in part.entries:
        report.skip(where, 'no_json_entry',
                    f'image has no entry in {json_name}')
        continue
      prompt, parsed = _parse_entry(part.entries[name], report, where)
      if prompt is None:
        report.skip(where, *parsed)
        continue
      row = None
      if meta is not None:
        row = meta.get(name)
        if row is None:
          report.warn('not_in_metadata', where)
        elif row[0] != prompt:
          report.warn('prompt_differs_from_metadata',
                      f'{where}: JSON {prompt!r:.100} (used) vs metadata '
                      f'{row[0]!r:.100}')
      rejected = _nsfw_filter(row[1:] if row else None, thresholds, report,
                              where)
      if rejected:
        report.skip(where, *rejected)
        continue
      member, num_bytes, crc = part.images[name]
      candidates.append(Candidate(
          id=f'part-{part.number:06d}/{name}', prompt=prompt,
          path=part_path if member else os.path.join(part_path, name),
          member=member, num_bytes=num_bytes, crc32=crc,
          features={**parsed, 'part': part.number}))
    return candidates


def _check_parts_present(manual_dir: epath.Path, collection: str,
                         selected: Iterable[int],
                         found: dict[int, list[epath.Path]]) -> None:
  missing = [p for p in selected if p not in found]
  if missing:
    looked = ([os.fspath(f) for f in part_folders(manual_dir, collection)]
              or ['diffusiondb-large-part-* folders (there are none)'])
    raise FileNotFoundError(
        f'{len(missing)} selected DiffusionDB {collection} part(s) are not '
        f'in manual_dir {os.fspath(manual_dir)} (looked in {looked}): '
        f'{format_parts(missing)}. Found: {format_parts(found) or "none"}. '
        f'Expected: {EXPECTED_LAYOUT[collection]}')


def _check_metadata_present(metadata_path: epath.Path) -> None:
  if not metadata_path.exists():
    raise FileNotFoundError(
        f'The NSFW filters (max_image_nsfw / max_prompt_nsfw) need the '
        f'scores in {os.fspath(metadata_path)}, which does not exist. '
        'Download it from the DiffusionDB repository or drop the filters.')


def build(data_dir: os.PathLike[str] | str,
          manual_dir: os.PathLike[str] | str, *, collection: str = '2m',
          parts: str | int | Iterable[int] = 'all', image_size: int = 256,
          resize_mode: str = 'center_crop', image_format: str = 'png',
          validation_fraction: float = 0.05, test_fraction: float = 0.05,
          split_seed: int = 0, dedup: bool = True,
          max_image_nsfw: float | None = None,
          max_prompt_nsfw: float | None = None, num_workers: int = 1,
          progress: bool = True) -> DiffusionDB:
  """Builds DiffusionDB under `data_dir` unless it is there; returns it.

  Args:
    data_dir: the TFDS data folder (the data set goes in
      data_dir/diffusion_db/<config name>/1.0.0).
    manual_dir: the downloaded parts (see the module docstring).
    collection: '2m' (PNG) or 'large' (WebP).
    parts: 'all' (every part in manual_dir), '1-200', '1,5,7-9', an integer
      or a list. Every selected part must be in manual_dir.
    image_size: stored images are image_size x image_size x 3.
    resize_mode: 'center_crop' or 'keep_aspect' (`preprocess`).
    image_format: 'png' (lossless) or 'jpeg' (quality 95, ~5x smaller).
    validation_fraction: share of prompts in the validation split.
    test_fraction: share of prompts in the test split.
    split_seed: salts the prompt hash that assigns splits.
    dedup: drop byte-identical images but the first.
    max_image_nsfw: drop images whose metadata image_nsfw score is above
      this (2.0 marks images SD itself flagged); unscored images are kept.
      None or negative: no filter.
    max_prompt_nsfw: the same for prompt_nsfw.
    num_workers: threads decoding and resizing images.
    progress: log progress and show TFDS progress bars.

  Returns:
    The prepared builder (array_record files); build_report.json is in
    `builder.data_path`.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if collection not in COLLECTIONS:
    raise ValueError(f'collection must be one of {COLLECTIONS}, got '
                     f'{collection!r}')
  numbers = parse_parts(parts, collection)
  settings = dict(
      collection=collection, image_size=image_size, resize_mode=resize_mode,
      image_format=image_format, validation_fraction=validation_fraction,
      test_fraction=test_fraction, split_seed=split_seed, dedup=dedup,
      max_image_nsfw=max_image_nsfw, max_prompt_nsfw=max_prompt_nsfw)
  if numbers is not None:  # Explicit parts: a finished build needs no input.
    builder = build_common.open_builder(
        DiffusionDB, data_dir, make_config(parts=numbers, **settings))
    if os.path.exists(builder.data_path):
      build_common.check_build(builder)
      return builder
  manual = build_common.check_manual_dir(
      manual_dir, EXPECTED_LAYOUT.get(collection, ''))
  found = find_parts(manual, collection)
  if numbers is None:
    if not found:
      _check_parts_present(manual, collection, [1], found)
    numbers = sorted(found)
  _check_parts_present(manual, collection, numbers, found)
  config = make_config(parts=numbers, **settings)
  if config.max_image_nsfw is not None or config.max_prompt_nsfw is not None:
    _check_metadata_present(manual / METADATA_FILES[collection])
  builder = build_common.open_builder(DiffusionDB, data_dir, config)
  return build_common.prepare(builder, manual, num_workers=num_workers,
                              progress=progress)
