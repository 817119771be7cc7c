"""Input pipeline: a deterministic, resumable stream of per-process batches.

The train stream is a function of the global example offset: offset `o` is
example `perm(epoch)[o % N]` with `epoch = o // N` and a per-epoch
permutation drawn from (shuffle_seed, epoch). Global batch `b` covers offsets
`[b*B, (b+1)*B)`, and process `p` of `P` reads only rows
`[p*B/P, (p+1)*B/P)` of it, by random access to the TFDS array_record data
source. So the stream is the same for any number of processes, and a resumed
run continues from the saved offset with no state but one integer. grain
reads ahead on threads.

A curriculum (`reverse_sd.curriculum`) splits the steps into stages, each
drawing from a pool of example indices (the easiest fraction). Within stage
`s`, which starts at step `t_s`, local offset `o - t_s*B` walks per-pass
permutations of the pool drawn from (shuffle_seed, s, pass); so resuming
mid-stage is as exact as without stages.
"""

from collections.abc import Callable, Iterator, Sequence
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
  # Applied to each decoded image (e.g. CLIP's resize + centre crop).
  image_fn: Callable[[np.ndarray], np.ndarray] | None = None
  # [N, F] cached frozen-backbone features; when set, batches carry them
  # instead of images and no image is read.
  features: np.ndarray | None = None
  # [N, T, D] per-example model input besides the image (the white-box
  # U-Net's caption context, sd_context='caption'); batches carry it as
  # 'context'. May be memory-mapped.
  context: np.ndarray | None = None

  def __post_init__(self):
    if len(self.source) != len(self.table):
      raise ValueError(f'Split {self.name!r}: {len(self.source)} images but '
                       f'{len(self.table)} targets.')
    if self.context is not None and (self.context.ndim != 3 or
                                     len(self.context) != len(self.table)):
      raise ValueError(f'Split {self.name!r}: per-example context of shape '
                       f'{self.context.shape}; expected [{len(self.table)}, '
                       'T, D].')
    if not len(self.source):
      raise ValueError(f'Split {self.name!r} is empty.')

  def __len__(self) -> int:
    return len(self.table)

  def load_images(self, indices: np.ndarray) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] images, after `image_fn`."""
    rows = self.source.__getitems__([int(i) for i in indices])
    images = [np.asarray(row['image'], np.uint8) for row in rows]
    if self.image_fn is not None:
      images = [self.image_fn(image) for image in images]
    return np.stack(images)

  def load(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs and targets of `indices` (all valid, non-negative)."""
    batch = {'embedding': self.table.embeddings[indices],
             'index': indices.astype(np.int32)}
    if self.features is not None:
      batch['features'] = self.features[indices]
    else:
      batch['image'] = self.load_images(indices)
    if self.context is not None:
      batch['context'] = np.asarray(self.context[indices])
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
  """Endless shuffled batches of a split, resumable from an example offset.

  `stages` (optional, from `curriculum.make_stages`) restricts the steps from
  each stage's `start_step` on to that stage's `pool` of example indices.
  """

  def __init__(self, split: SplitData, *, global_batch_size: int,
               shuffle_seed: int, process_index: int, process_count: int,
               num_threads: int = 2, prefetch: int = 4,
               stages: Sequence[object] | None = None):
    self._split = split
    self._batch_size = global_batch_size
    self._seed = shuffle_seed
    self._rows = process_rows(global_batch_size, process_index, process_count)
    self._read_options = grain.ReadOptions(num_threads=num_threads,
                                           prefetch_buffer_size=prefetch)
    self._stages = list(stages) if stages else None
    if self._stages:
      starts = [stage.start_step for stage in self._stages]
      if starts[0] != 0 or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f'Stage start steps {starts} must begin at 0 and '
                         'not decrease.')
      for stage in self._stages:
        pool = np.asarray(stage.pool)
        if not len(pool) or pool.min() < 0 or pool.max() >= len(split):
          raise ValueError(f'A stage pool must hold indices in [0, '
                           f'{len(split)}); got {len(pool)} indices.')
      self._starts = np.asarray(starts, np.int64)

  @functools.lru_cache(maxsize=4)
  def _permutation(self, stage: int, epoch: int) -> np.ndarray:
    if self._stages is None:
      rng = np.random.default_rng([self._seed, epoch])
      return rng.permutation(len(self._split))
    pool = np.asarray(self._stages[stage].pool)
    rng = np.random.default_rng([self._seed, stage, epoch])
    return pool[rng.permutation(len(pool))]

  def stage_of_step(self, step: int) -> int:
    """Index of the stage that step `step` trains in (0 without stages)."""
    if self._stages is None:
      return 0
    return int(np.searchsorted(self._starts, step, side='right') - 1)

  def global_indices(self, offset: int, count: int) -> np.ndarray:
    """Example indices of global offsets [offset, offset + count)."""
    offsets = np.arange(offset, offset + count)
    if self._stages is None:
      stages = np.zeros_like(offsets)
      local = offsets
      pool_sizes = np.full(1, len(self._split))
    else:
      stages = np.searchsorted(self._starts, offsets // self._batch_size,
                               side='right') - 1
      local = offsets - self._starts[stages] * self._batch_size
      pool_sizes = np.asarray([len(s.pool) for s in self._stages])
    epochs, positions = np.divmod(local, pool_sizes[stages])
    out = np.empty(count, np.int64)
    for stage, epoch in sorted(set(zip(stages.tolist(), epochs.tolist()))):
      where = (stages == stage) & (epochs == epoch)
      out[where] = self._permutation(stage, epoch)[positions[where]]
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


def input_shape(split: SplitData) -> tuple[int, ...]:
  """Shape of one model input of the split (an image, or its features)."""
  key = 'features' if split.features is not None else 'image'
  return tuple(split.load(np.array([0]))[key].shape[1:])


def eval_batches(split: SplitData, *, global_batch_size: int,
                 process_index: int, process_count: int,
                 image_shape: tuple[int, ...] | None = None) -> Iterator[dict]:
  """One pass over a split in order; the last batch is padded, with a mask.

  Batches carry 'image' (or 'features' when the split has cached features),
  'embedding', 'index' (-1 on padding) and 'mask'; and 'context' when the
  split has per-example contexts.
  """
  rows = process_rows(global_batch_size, process_index, process_count)
  total = len(split)
  key = 'features' if split.features is not None else 'image'
  shape = image_shape or input_shape(split)
  dtype = np.float32 if key == 'features' else np.uint8
  for start in range(0, total, global_batch_size):
    indices = np.arange(start, start + global_batch_size)[rows]
    valid = indices < total
    n = len(indices)
    out = {key: np.zeros((n, *shape), dtype),
           'embedding': np.zeros((n, split.table.embeddings.shape[1]),
                                 np.float32),
           'index': np.where(valid, indices, -1).astype(np.int32),
           'mask': valid.astype(np.float32)}
    if split.context is not None:
      out['context'] = np.zeros((n, *split.context.shape[1:]),
                                split.context.dtype)
    if valid.any():
      batch = split.load(indices[valid])
      for name in (key, 'embedding', 'context'):
        if name in out:
          out[name][valid] = batch[name]
    yield out
