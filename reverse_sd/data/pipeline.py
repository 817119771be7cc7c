"""Input pipeline: a deterministic, resumable stream of per-process batches.

The train stream is a function of the global example offset: offset `o` is
example `perm(epoch)[o % N]` with `epoch = o // N` and a per-epoch
permutation drawn from (shuffle_seed, epoch). Global batch `b` covers offsets
`[b*B, (b+1)*B)`, and process `p` of `P` reads only rows
`[p*B/P, (p+1)*B/P)` of it, by random access to the TFDS array_record data
source. So the stream is the same for any number of processes, and a resumed
run continues from the saved offset with no state but one integer. grain
reads ahead on threads.
"""

from collections.abc import Iterator
import dataclasses
import functools

import grain
import numpy as np

from reverse_sd.data import targets as targets_lib


@dataclasses.dataclass(frozen=True)
class SplitData:
  """A split: random-access images (TFDS data source) plus its side table."""
  name: str
  source: object  # Supports len() and __getitems__(list[int]) -> list[dict].
  table: targets_lib.SplitTable
  labels: np.ndarray | None = None  # [N, V] uint8 vocabulary multi-hot.

  def __post_init__(self):
    if len(self.source) != len(self.table):
      raise ValueError(f'Split {self.name!r}: {len(self.source)} images but '
                       f'{len(self.table)} targets.')
    if not len(self.source):
      raise ValueError(f'Split {self.name!r} is empty.')

  def __len__(self) -> int:
    return len(self.table)

  def load(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Images and targets of `indices` (all valid, non-negative)."""
    rows = self.source.__getitems__([int(i) for i in indices])
    images = np.stack([np.asarray(row['image'], np.uint8) for row in rows])
    batch = {'image': images,
             'embedding': self.table.embeddings[indices],
             'index': indices.astype(np.int32)}
    if self.labels is not None:
      batch['labels'] = self.labels[indices]
    return batch


def process_rows(global_batch_size: int, process_index: int,
                 process_count: int) -> slice:
  """This process's rows of every global batch."""
  if global_batch_size % process_count:
    raise ValueError(f'Batch size {global_batch_size} is not divisible by '
                     f'{process_count} processes.')
  per_process = global_batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


class TrainStream:
  """Endless shuffled batches of a split, resumable from an example offset."""

  def __init__(self, split: SplitData, *, global_batch_size: int,
               shuffle_seed: int, process_index: int, process_count: int,
               num_threads: int = 2, prefetch: int = 4):
    self._split = split
    self._batch_size = global_batch_size
    self._seed = shuffle_seed
    self._rows = process_rows(global_batch_size, process_index, process_count)
    self._read_options = grain.ReadOptions(num_threads=num_threads,
                                           prefetch_buffer_size=prefetch)

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    return rng.permutation(len(self._split))

  def global_indices(self, offset: int, count: int) -> np.ndarray:
    """Example indices of global offsets [offset, offset + count)."""
    offsets = np.arange(offset, offset + count)
    epochs, positions = np.divmod(offsets, len(self._split))
    out = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self._permutation(int(epoch))[positions[where]]
    return out

  def batch_at(self, offset: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch starting at `offset`."""
    indices = self.global_indices(offset, self._batch_size)[self._rows]
    return self._split.load(indices)

  def iterate(self, start_offset: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches from `start_offset` on; batch k starts at offset + k*B."""
    if start_offset % 1:
      raise ValueError(f'start_offset {start_offset} must be an integer.')
    dataset = grain.MapDataset.range(0, 2**62).map(
        lambda k: self.batch_at(start_offset + k * self._batch_size))
    return iter(dataset.to_iter_dataset(self._read_options))


def eval_batches(split: SplitData, *, global_batch_size: int,
                 process_index: int, process_count: int,
                 image_shape: tuple[int, int, int]) -> Iterator[dict]:
  """One pass over a split in order; the last batch is padded, with a mask."""
  rows = process_rows(global_batch_size, process_index, process_count)
  total = len(split)
  for start in range(0, total, global_batch_size):
    indices = np.arange(start, start + global_batch_size)[rows]
    valid = indices < total
    batch = split.load(indices[valid]) if valid.any() else None
    yield _pad(batch, valid, indices, image_shape, split.table.embeddings)


def _pad(batch, valid, indices, image_shape, embeddings) -> dict:
  n = len(indices)
  out = {'image': np.zeros((n, *image_shape), np.uint8),
         'embedding': np.zeros((n, embeddings.shape[1]), np.float32),
         'index': np.where(valid, indices, -1).astype(np.int32),
         'mask': valid.astype(np.float32)}
  if batch is not None:
    out['image'][valid] = batch['image']
    out['embedding'][valid] = batch['embedding']
  return out
