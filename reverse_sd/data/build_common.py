"""What the real-data TFDS builders share: options, splits, reading, report.

A builder subclasses `PromptImageBuilder` and implements `_scan`, which lists
the usable images (`Candidate`s) and reports what it had to skip. This
module then drops exact duplicate images, assigns every prompt to one split,
decodes and resizes the images (skipping and reporting unreadable ones) and
writes `build_report.json` beside the data, in the same atomic rename as the
TFDS files.

Splits are by prompt: the split of an example is a function of its
normalised prompt and `split_seed` only, so every image of a prompt lands in
the same split whatever parts are selected and in whatever order they are
read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any
import zipfile

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants
from tensorflow_datasets.core.utils import tqdm_utils

from reverse_sd.data import preprocess
from reverse_sd.data import synthetic
from reverse_sd.data.synthetic import BrokenBuildError

SPLITS: tuple[str, ...] = ('train', 'validation', 'test')
REPORT_NAME = 'build_report.json'
IMAGE_FORMATS: tuple[str, ...] = ('png', 'jpeg')
IMAGE_EXTENSIONS: tuple[str, ...] = ('.png', '.webp', '.jpg', '.jpeg', '.bmp',
                                     '.gif', '.tif', '.tiff')
_PROGRESS_EVERY = 5000  # Examples between progress log lines.
_MAX_LISTED_WARNINGS = 100  # Per warning kind; the count is always exact.

__all__ = ['BrokenBuildError']  # Re-exported: one error type for all builds.


# ----------------------------------------------------------------- options --


@dataclasses.dataclass(eq=False)
class PromptImageConfig(tfds.core.BuilderConfig):
  """Options shared by the real-data builders (see `common_name`)."""

  image_size: int = 256
  resize_mode: str = 'center_crop'
  image_format: str = 'png'
  validation_fraction: float = 0.05
  test_fraction: float = 0.05
  split_seed: int = 0
  dedup: bool = True


COMMON_OPTIONS: tuple[str, ...] = (
    'image_size', 'resize_mode', 'image_format', 'validation_fraction',
    'test_fraction', 'split_seed', 'dedup')


def check_common_options(*, image_size: int, resize_mode: str,
                         image_format: str, validation_fraction: float,
                         test_fraction: float, split_seed: int,
                         dedup: bool) -> dict[str, Any]:
  """Validates the shared options; returns them normalised (plain types)."""
  if (not isinstance(image_size, (int, np.integer)) or
      isinstance(image_size, bool) or image_size < 8):
    raise ValueError(f'image_size must be an integer >= 8, got {image_size!r}')
  if resize_mode not in preprocess.RESIZE_MODES:
    raise ValueError(f'resize_mode must be one of {preprocess.RESIZE_MODES}, '
                     f'got {resize_mode!r}')
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f'image_format must be one of {IMAGE_FORMATS}, got '
                     f'{image_format!r}')
  for key, value in (('validation_fraction', validation_fraction),
                     ('test_fraction', test_fraction)):
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ValueError(f'{key} must be in [0, 1), got {value!r}')
  if validation_fraction + test_fraction >= 1:
    raise ValueError('validation_fraction + test_fraction must be < 1 (the '
                     f'rest is train), got {validation_fraction} + '
                     f'{test_fraction}')
  if (not isinstance(split_seed, (int, np.integer)) or
      isinstance(split_seed, bool) or split_seed < 0):
    raise ValueError(f'split_seed must be an integer >= 0, got {split_seed!r}')
  if not isinstance(dedup, (bool, np.bool_)):
    raise ValueError(f'dedup must be True or False, got {dedup!r}')
  return dict(image_size=int(image_size), resize_mode=resize_mode,
              image_format=image_format,
              validation_fraction=float(validation_fraction),
              test_fraction=float(test_fraction), split_seed=int(split_seed),
              dedup=bool(dedup))


def common_name(options: dict[str, Any]) -> str:
  """E.g. '256px_crop_png_v0.05_t0.05_s0_dedup'; part of a config name."""
  mode = {'center_crop': 'crop', 'keep_aspect': 'pad'}[options['resize_mode']]
  return (f'{options["image_size"]}px_{mode}_{options["image_format"]}_'
          f'v{options["validation_fraction"]:g}_'
          f't{options["test_fraction"]:g}_s{options["split_seed"]}_'
          f'{"dedup" if options["dedup"] else "nodedup"}')


def safe_name(text: str) -> str:
  """`text` with characters TFDS config names refuse replaced by '-'."""
  return re.sub(r'[^\w+.\-]', '-', text)


# ------------------------------------------------------------------ splits --


def normalise_prompt(prompt: str) -> str:
  """Lower case, whitespace runs collapsed to one space, ends stripped."""
  return ' '.join(prompt.lower().split())


def split_for_prompt(prompt: str, *, split_seed: int,
                     validation_fraction: float, test_fraction: float) -> str:
  """The split of every image of `prompt`: a stable hash, no state.

  A uniform number u in [0, 1) from sha256(split_seed, normalised prompt):
  test if u < test_fraction, validation if below the sum, else train. So
  growing the validation fraction never moves a test prompt.
  """
  key = f'{split_seed}\x00{normalise_prompt(prompt)}'.encode('utf-8')
  digest = hashlib.sha256(key).digest()
  unit = int.from_bytes(digest[:8], 'big') / 2.0**64
  if unit < test_fraction:
    return 'test'
  if unit < test_fraction + validation_fraction:
    return 'validation'
  return 'train'


# -------------------------------------------------------------- candidates --


@dataclasses.dataclass(slots=True)  # Millions of them: no __dict__.
class Candidate:
  """One image that passed the scan, with its prompt and extra features."""

  id: str  # Unique; the targets are keyed by it.
  prompt: str
  path: str  # The image file, or the zip holding it.
  member: str | None = None  # The name inside the zip, if zipped.
  num_bytes: int = -1  # Encoded size, -1 if unknown (only for dedup).
  crc32: int | None = None  # Zip members have it for free.
  features: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def file(self) -> str:
    """Where it is, for messages: the path, or 'ZIP:member'."""
    return self.path if self.member is None else f'{self.path}:{self.member}'


class ImageReader:
  """Reads candidates' bytes, keeping the last zip open (they come in order)."""

  def __init__(self):
    self._zip_path: str | None = None
    self._zip: zipfile.ZipFile | None = None

  def read(self, candidate: Candidate) -> bytes:
    if candidate.member is None:
      with open(candidate.path, 'rb') as f:
        return f.read()
    if candidate.path != self._zip_path:
      self.close()
      self._zip = zipfile.ZipFile(candidate.path)
      self._zip_path = candidate.path
    return self._zip.read(candidate.member)  # Checks the CRC.

  def sample(self, candidate: Candidate, size: int = 4096) -> bytes:
    """A few bytes from the middle of a loose file (zips have a CRC)."""
    if candidate.member is not None:
      return b''
    with open(candidate.path, 'rb') as f:
      f.seek(max(candidate.num_bytes // 2 - size // 2, 0))
      return f.read(size)

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()
    self._zip, self._zip_path = None, None

  def __enter__(self) -> ImageReader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ------------------------------------------------------------------ report --


class BuildReport:
  """Collects what a build skipped and why; becomes build_report.json.

  Every image or listed entry the scan saw ends as either one example or one
  `skipped` entry, so `items_seen = examples + skipped`. Whole parts or files
  that could not be used at all are in `skipped_parts` (their images are not
  items). `warnings` are kept examples with something to note.
  """

  def __init__(self):
    self.skipped: list[dict[str, str]] = []
    self.skipped_parts: list[dict[str, str]] = []
    self.warning_counts: collections.Counter[str] = collections.Counter()
    self.warnings: dict[str, list[str]] = collections.defaultdict(list)
    self.stats: dict[str, Any] = {}

  def skip(self, file: str, reason: str, detail: str) -> None:
    """One item (an image or an entry naming one) is left out."""
    self.skipped.append({'file': file, 'reason': reason, 'detail': detail})

  def skip_part(self, file: str, reason: str, detail: str) -> None:
    """A whole part / list file is left out."""
    logging.warning('Skipping %s: %s (%s)', file, reason, detail)
    self.skipped_parts.append({'file': file, 'reason': reason,
                               'detail': detail})

  def warn(self, kind: str, message: str) -> None:
    """Something to note about a kept example (counted; first ones listed)."""
    self.warning_counts[kind] += 1
    if len(self.warnings[kind]) < _MAX_LISTED_WARNINGS:
      self.warnings[kind].append(message)

  def skipped_counts(self) -> dict[str, int]:
    return dict(sorted(collections.Counter(
        item['reason'] for item in self.skipped).items()))

  def to_dict(self, *, header: dict[str, Any],
              examples: dict[str, int],
              prompts: dict[str, int]) -> dict[str, Any]:
    total = sum(examples.values())
    return {
        **header,
        'examples': examples,
        'total_examples': total,
        'distinct_prompts': prompts,
        'items_seen': total + len(self.skipped),
        'total_skipped': len(self.skipped),
        'skipped_counts': self.skipped_counts(),
        'skipped_parts': self.skipped_parts,
        'warning_counts': dict(sorted(self.warning_counts.items())),
        'warnings': dict(sorted(self.warnings.items())),
        'stats': self.stats,
        'skipped': self.skipped,
    }


def write_json_atomic(path: os.PathLike[str] | str, data: Any) -> None:
  """Writes JSON to a temporary file in the folder, then renames it."""
  path = os.fspath(path)
  folder = os.path.dirname(path) or '.'
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-',
                             suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(data, f, indent=1, ensure_ascii=False)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_report(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The build_report.json of a prepared builder."""
  path = os.path.join(os.fspath(builder.data_path), REPORT_NAME)
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def report_summary(report: dict[str, Any]) -> str:
  """A few human-readable lines: examples per split, skipped counts."""
  lines = [f'{report["builder"]}/{report["config"]}: '
           f'{report["total_examples"]} examples '
           f'({", ".join(f"{k} {v}" for k, v in report["examples"].items())}'
           f'); {report["total_skipped"]} of {report["items_seen"]} items '
           'skipped.']
  for reason, count in report['skipped_counts'].items():
    lines.append(f'  skipped {reason}: {count}')
  for part in report['skipped_parts']:
    lines.append(f'  skipped part {part["file"]}: {part["reason"]} '
                 f'({part["detail"]})')
  for kind, count in report['warning_counts'].items():
    lines.append(f'  warning {kind}: {count}')
  return '\n'.join(lines)


# ----------------------------------------------------- dedup and splitting --


def drop_duplicate_images(candidates: Sequence[Candidate],
                          reader_factory: Callable[[], ImageReader],
                          report: BuildReport) -> list[Candidate]:
  """Keeps the first of each set of byte-identical images (in given order).

  Only images that share (size, zip CRC or a sample of their middle bytes)
  are read in full and hashed, so deduplication reads little beyond the
  zip directories and a few KB per loose file.
  """
  with reader_factory() as reader:
    suspects = _group_suspects(range(len(candidates)), candidates,
                               lambda c: (c.num_bytes, c.crc32))
    suspects = _group_suspects(
        suspects, candidates,
        lambda c: (c.num_bytes, c.crc32, _try(reader.sample, c)))
    first_of_hash: dict[bytes, Candidate] = {}
    dropped: set[int] = set()
    for index in suspects:
      candidate = candidates[index]
      data = _try(reader.read, candidate)
      if data is None:
        continue  # Unreadable: the decode step reports it.
      kept = first_of_hash.setdefault(hashlib.sha256(data).digest(),
                                      candidate)
      if kept is not candidate:
        dropped.add(index)
        report.skip(candidate.file, 'duplicate_image',
                    f'same bytes as {kept.id}' +
                    (' (same prompt)' if kept.prompt == candidate.prompt
                     else f' (prompt differs: kept {kept.prompt!r:.100})'))
  return [c for i, c in enumerate(candidates) if i not in dropped]


def _group_suspects(indices: Iterable[int], candidates: Sequence[Candidate],
                    key_fn: Callable[[Candidate], Any]) -> list[int]:
  """The indices whose key is shared with another index, sorted."""
  groups: dict[Any, list[int]] = collections.defaultdict(list)
  for index in indices:
    groups[key_fn(candidates[index])].append(index)
  return sorted(i for members in groups.values() if len(members) > 1
                for i in members)


def _try(read_fn: Callable[[Candidate], bytes],
         candidate: Candidate) -> bytes | None:
  try:
    return read_fn(candidate)
  except Exception:  # pylint: disable=broad-except
    return None


def assign_splits(candidates: Sequence[Candidate],
                  options: dict[str, Any]) -> dict[str, list[Candidate]]:
  """Candidates per split (input order kept), by `split_for_prompt`."""
  by_split: dict[str, list[Candidate]] = {split: [] for split in SPLITS}
  for candidate in candidates:
    split = split_for_prompt(
        candidate.prompt, split_seed=options['split_seed'],
        validation_fraction=options['validation_fraction'],
        test_fraction=options['test_fraction'])
    by_split[split].append(candidate)
  return by_split


# ---------------------------------------------------------------- decoding --


def process_image(data: bytes, *, name: str, image_size: int,
                  resize_mode: str, image_format: str) -> bytes:
  """Decodes, resizes to image_size x image_size and re-encodes one image."""
  image = preprocess.load_image(data, name=name)
  image = preprocess.resize_and_crop(image, image_size, resize_mode)
  return preprocess.encode_image(np.ascontiguousarray(image), image_format)


class _Decoder:
  """Turns candidates into encoded fixed-size images, in order, in threads.

  Bytes are read on the calling thread (zips are read sequentially); PIL
  releases the GIL while decoding and resizing, so threads overlap that.
  Failures go to the report and the candidate is dropped.
  """

  def __init__(self, options: dict[str, Any], report: BuildReport,
               num_workers: int):
    self._options, self._report = options, report
    self._num_workers = max(1, int(num_workers))

  def _work(self, item: tuple[Candidate, bytes | Exception]
            ) -> bytes | tuple[str, str]:
    """The encoded image, or (reason, detail) why there is none."""
    candidate, data = item
    if isinstance(data, Exception):
      return 'unreadable_file', f'{type(data).__name__}: {data}'
    try:
      return process_image(
          data, name=candidate.file,
          image_size=self._options['image_size'],
          resize_mode=self._options['resize_mode'],
          image_format=self._options['image_format'])
    except ValueError as error:
      return 'corrupt_image', str(error)

  def _read_all(self, reader: ImageReader,
                chunk: Sequence[Candidate]) -> list[tuple[Candidate, Any]]:
    items = []
    for candidate in chunk:
      try:
        items.append((candidate, reader.read(candidate)))
      except Exception as error:  # pylint: disable=broad-except
        items.append((candidate, error))
    return items

  def __call__(self,
               candidates: Sequence[Candidate]
               ) -> Iterator[tuple[Candidate, bytes]]:
    chunk_size = 32 * self._num_workers
    pool = (concurrent.futures.ThreadPoolExecutor(self._num_workers)
            if self._num_workers > 1 else None)
    try:
      with ImageReader() as reader:
        for start in range(0, len(candidates), chunk_size):
          items = self._read_all(reader, candidates[start:start + chunk_size])
          results = (pool.map(self._work, items) if pool else
                     map(self._work, items))
          for (candidate, _), result in zip(items, results):
            if isinstance(result, bytes):
              yield candidate, result
            else:
              self._report.skip(candidate.file, *result)
    finally:
      if pool:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------- builder --


class PromptImageBuilder(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
  """Base of the real-data builders: features id, image, prompt (+ extras).

  Subclasses set VERSION, MANUAL_DOWNLOAD_INSTRUCTIONS and implement
  `_scan` (and `_extra_features`, `_report_header` if they add any).
  """

  log_progress = True
  num_workers = 1  # Decoding threads; set by the build functions.

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds this path through `importlib_resources`, which it
    # declares only for Python < 3.9; naming the file avoids that import.
    return epath.Path(inspect.getfile(cls))

  def _scan(self, manual_dir: epath.Path,
            report: BuildReport) -> list[Candidate]:
    """The usable images in a deterministic order; reports what it skips."""
    raise NotImplementedError

  def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {}

  def _report_header(self) -> dict[str, Any]:
    return {}

  def _options(self) -> dict[str, Any]:
    return {name: getattr(self.builder_config, name)
            for name in COMMON_OPTIONS}

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    features = tfds.features.FeaturesDict({
        'id': tfds.features.Text(),
        'image': tfds.features.Image(shape=(size, size, 3),
                                     encoding_format=config.image_format),
        'prompt': tfds.features.Text(),
        **self._extra_features(),
    })
    return tfds.core.DatasetInfo(
        builder=self,
        description=inspect.getdoc(type(self)),
        features=features,
        # Records keep the scan's order: deterministic, ids sorted by source.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    options = self._options()
    self._report = BuildReport()
    self._decoder = _Decoder(options, self._report, self.num_workers)
    start = time.perf_counter()
    candidates = self._scan(manual_dir, self._report)
    if options['dedup']:
      candidates = drop_duplicate_images(candidates, ImageReader,
                                         self._report)
    by_split = assign_splits(candidates, options)
    self._report.stats['scan_seconds'] = round(
        time.perf_counter() - start, 3)
    generators = {}
    for split, members in by_split.items():
      # TFDS cannot write an empty split: start each at a readable image.
      first = self._first_readable(members)
      if first is None:
        if split == 'train' or options[f'{split}_fraction'] > 0:
          self._report.warn('empty_split', f'{split}: no readable images')
        continue
      index, encoded = first
      generators[split] = self._generate_examples(split, members[index:],
                                                  encoded)
    if not generators:
      raise ValueError(
          f'No readable images in {manual_dir} for {self.name}/'
          f'{self.builder_config.name}; skipped: '
          f'{self._report.skipped_counts()}, parts skipped: '
          f'{[p["file"] for p in self._report.skipped_parts]}.')
    self._examples = {split: 0 for split in generators}
    self._prompts = {split: set() for split in generators}
    return generators

  def _first_readable(self, members: Sequence[Candidate]
                      ) -> tuple[int, bytes] | None:
    for index, member in enumerate(members):
      for _, encoded in self._decoder([member]):
        return index, encoded
    return None

  def _generate_examples(self, split: str, candidates: Sequence[Candidate],
                         first_encoded: bytes
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    start = time.perf_counter()
    stream = itertools.chain([(candidates[0], first_encoded)],
                             self._decoder(candidates[1:]))
    for index, (candidate, encoded) in enumerate(stream):
      self._examples[split] += 1
      self._prompts[split].add(normalise_prompt(candidate.prompt))
      yield index, {'id': candidate.id, 'image': encoded,
                    'prompt': candidate.prompt, **candidate.features}
      done = index + 1
      if self.log_progress and done % _PROGRESS_EVERY == 0:
        rate = done / max(time.perf_counter() - start, 1e-9)
        logging.info('%s %s: %d/%d examples, %.0f examples/s', self.name,
                     split, done, len(candidates), rate)

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_path is still the temporary folder here: the report is
    # renamed into place with the data, or not at all.
    report = self._report.to_dict(
        header={'builder': self.name, 'config': self.builder_config.name,
                'version': str(self.version),
                'manual_dir': os.fspath(dl_manager.manual_dir),
                'options': self._options(), **self._report_header()},
        examples={s: self._examples.get(s, 0) for s in SPLITS},
        prompts={s: len(self._prompts.get(s, ())) for s in SPLITS})
    write_json_atomic(os.path.join(os.fspath(self.data_path), REPORT_NAME),
                      report)


# ------------------------------------------------------ building, checking --


def check_manual_dir(manual_dir: os.PathLike[str] | str,
                     expected: str) -> epath.Path:
  """The manual_dir as a path; a clear error if it is missing or empty."""
  path = epath.Path(os.path.expanduser(os.fspath(manual_dir)))
  if not path.exists():
    raise FileNotFoundError(f'manual_dir {os.fspath(path)} does not exist. '
                            f'Expected there: {expected}')
  if not path.is_dir():
    raise NotADirectoryError(f'manual_dir {os.fspath(path)} is a file, not a '
                             f'folder. Expected a folder holding: {expected}')
  if not any(path.iterdir()):
    raise FileNotFoundError(f'manual_dir {os.fspath(path)} is empty. '
                            f'Expected there: {expected}')
  return path


def remove_incomplete_builds(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Deletes the temporary folders a killed prepare left beside data_path.

  TFDS prepares into 'incomplete.XXXXXX_<version>' and renames it at the
  end; an exception removes it, but a killed process leaves it behind. It
  does not block the next build (the name is random) but can be large.
  Only call when no other process is building the same config.
  """
  data_path = epath.Path(builder.data_path)
  pattern = f'{tfds_constants.INCOMPLETE_PREFIX}*_{data_path.name}'
  removed = []
  if data_path.parent.exists():
    for path in sorted(data_path.parent.glob(pattern)):
      logging.warning('Removing %s, left by an interrupted build.', path)
      shutil.rmtree(os.fspath(path), ignore_errors=True)
      removed.append(os.fspath(path))
  return removed


def _broken(path, problem: str, variant_dir) -> BrokenBuildError:
  return BrokenBuildError(
      f'{path}: {problem}. The prepared data set in {variant_dir} is '
      'incomplete or corrupt (an interrupted build or copy?). Delete that '
      'folder and build again; nothing was deleted.')


def check_build(builder: tfds.core.DatasetBuilder) -> None:
  """Raises BrokenBuildError unless the report and every shard are sound.

  Cheap: reads file footers, not records.
  """
  variant_dir = os.fspath(builder.data_path)
  broken = functools.partial(_broken, variant_dir=variant_dir)
  for name in ('dataset_info.json', REPORT_NAME):
    synthetic.check_json_file(os.path.join(variant_dir, name), broken)
  if not builder.info.splits:
    raise broken(os.path.join(variant_dir, 'dataset_info.json'),
                 'lists no splits')
  for split_info in builder.info.splits.values():
    synthetic.check_shards(split_info, broken)


def prepare(builder: PromptImageBuilder, manual_dir: epath.Path, *,
            num_workers: int = 1, progress: bool = True) -> PromptImageBuilder:
  """Prepares `builder` from `manual_dir` unless already built; checks it."""
  if not os.path.exists(builder.data_path):
    remove_incomplete_builds(builder)
    start = time.perf_counter()
    if progress:
      logging.info('Building %s from %s into %s', builder.name, manual_dir,
                   builder.data_path)
    builder.log_progress = progress
    builder.num_workers = num_workers
    bars_were_on = getattr(tqdm_utils, '_active', True)
    tfds.display_progress_bar(progress)
    try:
      with tempfile.TemporaryDirectory() as download_dir:
        builder.download_and_prepare(
            download_dir=download_dir,
            file_format='array_record',
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir),
                try_download_gcs=False,
                compute_stats=tfds.download.ComputeStatsMode.SKIP))
    finally:
      tfds.display_progress_bar(bars_were_on)
    if progress:
      logging.info('Built %s in %.1f s', builder.data_path,
                   time.perf_counter() - start)
  check_build(builder)
  return builder


def open_builder(builder_cls: type[PromptImageBuilder], data_dir: str,
                 config: PromptImageConfig) -> PromptImageBuilder:
  """Constructs the builder; a damaged dataset_info.json is a clear error."""
  variant_dir = os.path.join(data_dir, builder_cls.name, config.name,
                             str(builder_cls.VERSION))
  info_path = os.path.join(variant_dir, 'dataset_info.json')
  try:
    return builder_cls(data_dir=data_dir, config=config,
                       file_format='array_record')
  except Exception as error:  # pylint: disable=broad-except
    if os.path.exists(info_path):
      raise _broken(info_path, f'cannot be read ({type(error).__name__}: '
                    f'{error})', variant_dir) from error
    raise
