"""Per-split side tables: ids, prompts, attributes and cached prompt embeddings.

The prompt embeddings (all-MiniLM-L6-v2) are the regression targets. They are
computed once per data set and cached beside it, keyed by example id, so a
rerun skips the embedding pass. The table's rows follow the data source's
order (verified by id at load time), so a batch of example indices picks its
targets by plain indexing.
"""

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

CACHE_DIR_NAME = 'reverse_sd_targets'
CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SplitTable:
  """Everything but the images, for one split, in data-source order."""
  ids: np.ndarray  # [N] str
  prompts: np.ndarray  # [N] str
  embeddings: np.ndarray  # [N, 384] float32, unit norm
  attributes: np.ndarray | None  # [N, A] uint8 (synthetic data only)

  def __len__(self) -> int:
    return len(self.ids)


def _read_metadata(source) -> dict[str, np.ndarray]:
  """Reads ids, prompts and attributes of a split without its images."""
  ids, prompts, attributes = [], [], []
  chunk = 1024
  for start in range(0, len(source), chunk):
    rows = source.__getitems__(list(range(start, min(start + chunk,
                                                     len(source)))))
    for row in rows:
      ids.append(_text(row['id']))
      prompts.append(_text(row['prompt']))
      if 'attributes' in row:
        attributes.append(np.asarray(row['attributes'], np.uint8))
  return {
      'ids': np.asarray(ids, dtype=str),
      'prompts': np.asarray(prompts, dtype=str),
      'attributes': np.stack(attributes) if attributes else None,
  }


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def cache_path(builder: tfds.core.DatasetBuilder, split: str,
               encoder_tag: str) -> pathlib.Path:
  return (pathlib.Path(builder.data_dir) / CACHE_DIR_NAME / encoder_tag /
          f'{split}.npz')


def load_or_compute(builder: tfds.core.DatasetBuilder, split: str, *,
                    encoder_factory: Callable[[], object],
                    encoder_tag: str = 'all-MiniLM-L6-v2') -> SplitTable:
  """Returns the split's side table, computing and caching embeddings once.

  Args:
    builder: a prepared TFDS builder (array_record files).
    split: split name.
    encoder_factory: returns an object with `encode(prompts, progress=...)`;
      called only when the cache is missing.
    encoder_tag: names the cache folder, so another encoder never reuses it.
  """
  source = builder.as_data_source(
      split, decoders={'image': tfds.decode.SkipDecoding()})
  path = cache_path(builder, split, encoder_tag)
  if path.exists():
    table = _load_cache(path)
    _check_alignment(table, source, path)
    return table
  start = time.time()
  meta = _read_metadata(source)
  if len(set(meta['ids'].tolist())) != len(meta['ids']):
    raise ValueError(f'Split {split!r} of {builder.data_dir} has duplicate '
                     'example ids; the targets are keyed by id.')
  encoder = encoder_factory()
  # Identical prompts share one embedding; encode each distinct prompt once.
  unique_prompts, inverse = np.unique(meta['prompts'], return_inverse=True)
  logging.info('Embedding %d prompts (%d distinct) of split %r ...',
               len(meta['prompts']), len(unique_prompts), split)
  progress = _ProgressLogger(f'embed {split}', len(unique_prompts))
  unique_embeddings = encoder.encode(list(unique_prompts), progress=progress)
  embeddings = np.asarray(unique_embeddings, np.float32)[inverse]
  table = SplitTable(meta['ids'], meta['prompts'], embeddings,
                     meta['attributes'])
  _save_cache(path, table)
  logging.info('Embedded split %r in %.1f s (%.0f prompts/s); cached at %s',
               split, time.time() - start,
               len(unique_prompts) / max(time.time() - start, 1e-9), path)
  return table


class _ProgressLogger:
  """Logs `done/total` with a rate at most every few seconds."""

  def __init__(self, name: str, total: int, every_secs: float = 10.0):
    self._name, self._total, self._every = name, total, every_secs
    self._start = self._last = time.time()

  def __call__(self, done: int, total: int) -> None:
    now = time.time()
    if now - self._last >= self._every or done >= total:
      self._last = now
      rate = done / max(now - self._start, 1e-9)
      eta = (total - done) / max(rate, 1e-9)
      logging.info('%s: %d/%d (%.0f/s, ETA %.0f s)', self._name, done, total,
                   rate, eta)


def _save_cache(path: pathlib.Path, table: SplitTable) -> None:
  """Writes atomically: a killed run never leaves a half-written cache."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f'.tmp-{os.getpid()}.npz')
  arrays = dict(ids=table.ids, prompts=table.prompts,
                embeddings=table.embeddings,
                format_version=np.int32(CACHE_FORMAT_VERSION))
  if table.attributes is not None:
    arrays['attributes'] = table.attributes
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _load_cache(path: pathlib.Path) -> SplitTable:
  try:
    with np.load(path, allow_pickle=False) as data:
      if int(data['format_version']) != CACHE_FORMAT_VERSION:
        raise ValueError(f'format version {int(data["format_version"])}, '
                         f'expected {CACHE_FORMAT_VERSION}')
      return SplitTable(
          ids=data['ids'], prompts=data['prompts'],
          embeddings=data['embeddings'].astype(np.float32),
          attributes=data['attributes'] if 'attributes' in data else None)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'The target cache {path} is unreadable ({type(e).__name__}: {e}). '
        'Delete that file to recompute it.') from e


def _check_alignment(table: SplitTable, source, path: pathlib.Path) -> None:
  """Checks that cached rows still match the data source's ids, in order."""
  if len(table) != len(source):
    raise ValueError(f'The target cache {path} has {len(table)} rows but the '
                     f'split has {len(source)} examples. Delete the cache.')
  probe = sorted({0, len(source) // 2, len(source) - 1})
  for index, row in zip(probe, source.__getitems__(probe)):
    if _text(row['id']) != table.ids[index]:
      raise ValueError(f'The target cache {path} does not match the data set '
                       f'(row {index}: {table.ids[index]!r} vs '
                       f'{_text(row["id"])!r}). Delete the cache.')
