"""A prompt bank: prompts with their MiniLM embeddings, searched by cosine.

Predictions are read by their nearest prompts. A bank comes from a split's
side table (the prompts and target embeddings the run trained on), or from a
text file of prompts, one per line, embedded once with the run's target
encoder and cached beside the file:

  bank = PromptBank.from_table(train.table.prompts, train.table.embeddings)
  bank = PromptBank.from_text_file('prompts.txt', encoder_factory)
  rows_NxK, cosines_NxK = bank.nearest(predicted_NxD, k=5)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import logging
import os
import pathlib

import numpy as np

CACHE_SUFFIX = '.minilm.npz'
CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PromptBank:
  """Distinct prompts and their unit-norm embeddings, row by row."""
  prompts: np.ndarray  # [M] str
  embeddings: np.ndarray  # [M, D] float32, unit norm
  source: str  # Where the prompts came from, for messages and reports.

  def __post_init__(self):
    if self.embeddings.ndim != 2 or len(self.prompts) != len(self.embeddings):
      raise ValueError(
          f'Prompt bank {self.source}: {len(self.prompts)} prompts but '
          f'embeddings of shape {self.embeddings.shape}; expected [M, D].')
    if not len(self.prompts):
      raise ValueError(f'Prompt bank {self.source} has no prompts.')

  def __len__(self) -> int:
    return len(self.prompts)

  @classmethod
  def from_table(cls, prompts: Sequence[str], embeddings_NxD: np.ndarray, *,
                 source: str, dedupe: bool = True) -> PromptBank:
    """A bank of a split's prompts; repeated prompts are kept once."""
    prompts = np.asarray(prompts, dtype=str)
    embeddings_NxD = np.asarray(embeddings_NxD, np.float32)
    if dedupe:
      _, first = np.unique(prompts, return_index=True)
      keep = np.sort(first)
      prompts, embeddings_NxD = prompts[keep], embeddings_NxD[keep]
    return cls(prompts, _unit_rows(embeddings_NxD), source)

  @classmethod
  def from_text_file(cls, path: str | os.PathLike[str],
                     encoder_factory: Callable[[], object], *,
                     encoder_tag: str = '') -> PromptBank:
    """The prompts of a text file (one per line), embedded and cached.

    Blank lines are skipped and repeated prompts kept once. The embeddings
    are cached as `<path>.minilm.npz`, valid while the file's text and
    `encoder_tag` (which encoder embedded them) are unchanged; a folder that
    cannot be written only costs the cache.

    Args:
      path: a UTF-8 text file.
      encoder_factory: returns an object with `encode(prompts) -> [N, D]`
        (e.g. `minilm.SentenceEncoder`); called only on a cache miss.
      encoder_tag: identifies the encoder (e.g. its model folder).
    """
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'Prompt bank file {path} does not exist.')
    try:
      text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
      raise ValueError(f'Prompt bank file {path} is not UTF-8 text ({e}).'
                       ) from e
    prompts = list(dict.fromkeys(
        line.strip() for line in text.splitlines() if line.strip()))
    if not prompts:
      raise ValueError(f'Prompt bank file {path} has no prompts (expected one '
                       'prompt per line).')
    key = hashlib.sha256((encoder_tag + '\0' + '\n'.join(prompts)).encode()
                         ).hexdigest()
    cache = path.with_name(path.name + CACHE_SUFFIX)
    embeddings = _load_cache(cache, key, len(prompts))
    if embeddings is None:
      logging.info('Embedding %d prompts of %s ...', len(prompts), path)
      embeddings = np.asarray(encoder_factory().encode(prompts), np.float32)
      _save_cache(cache, key, embeddings)
    return cls(np.asarray(prompts, dtype=str), _unit_rows(embeddings),
               str(path))

  def nearest(self, queries_NxD: np.ndarray, k: int, *,
              chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The k bank rows nearest to each query by cosine, nearest first.

    Returns:
      (rows [N, k'] int64, cosines [N, k'] float32) with k' = min(k, M).
      Ties go to the lower row.
    """
    queries_NxD = np.asarray(queries_NxD, np.float32)
    dim = self.embeddings.shape[1]
    if queries_NxD.ndim != 2 or queries_NxD.shape[1] != dim:
      raise ValueError(
          f'Queries of shape {queries_NxD.shape} do not match prompt bank '
          f'{self.source} of dimension {dim}.')
    if k < 1:
      raise ValueError(f'k must be >= 1, got {k}.')
    k = min(int(k), len(self))
    queries_NxD = _unit_rows(queries_NxD)
    rows, cosines = [], []
    for start in range(0, len(queries_NxD), chunk_size):
      sims_CxM = queries_NxD[start:start + chunk_size] @ self.embeddings.T
      if k < sims_CxM.shape[1]:
        top = np.argpartition(-sims_CxM, k - 1, axis=1)[:, :k]
      else:
        top = np.broadcast_to(np.arange(sims_CxM.shape[1]), sims_CxM.shape)
      top_sims = np.take_along_axis(sims_CxM, top, axis=1)
      # Sort by (-cosine, row): a deterministic order for ties.
      order = np.lexsort((top, -top_sims), axis=1)
      rows.append(np.take_along_axis(top, order, axis=1))
      cosines.append(np.take_along_axis(top_sims, order, axis=1))
    if not rows:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return (np.concatenate(rows).astype(np.int64),
            np.concatenate(cosines).astype(np.float32))


def _unit_rows(x_NxD: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x_NxD, axis=1, keepdims=True)
  return (x_NxD / np.maximum(norms, 1e-12)).astype(np.float32)


def _load_cache(path: pathlib.Path, key: str, count: int) -> np.ndarray | None:
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      if (int(data['format_version']) != CACHE_FORMAT_VERSION or
          str(data['key']) != key):
        return None
      embeddings = np.asarray(data['embeddings'], np.float32)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Ignoring unreadable prompt bank cache %s (%s: %s).', path,
                    type(e).__name__, e)
    return None
  return embeddings if len(embeddings) == count else None


def _save_cache(path: pathlib.Path, key: str, embeddings: np.ndarray) -> None:
  tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}.npz')
  try:
    np.savez(tmp, embeddings=embeddings, key=np.asarray(key),
             format_version=np.int32(CACHE_FORMAT_VERSION))
    os.replace(tmp, path)
  except OSError as e:
    logging.warning('Could not cache prompt embeddings at %s (%s); they will '
                    'be computed again next time.', path, e)
    tmp.unlink(missing_ok=True)
