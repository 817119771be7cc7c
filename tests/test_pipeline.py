"""The train stream: deterministic, resumable, split across processes."""

import numpy as np
import pytest

from reverse_sd.data import pipeline
from reverse_sd.data import targets


class _FakeSource:
  """In-memory stand-in for a TFDS data source: image i is filled with i."""

  def __init__(self, n):
    self._n = n

  def __len__(self):
    return self._n

  def __getitems__(self, indices):
    return [{'image': np.full((4, 4, 3), i, np.uint8)} for i in indices]


def _split(n=10):
  table = targets.SplitTable(
      ids=np.array([f'train/{i}' for i in range(n)]),
      prompts=np.array([f'prompt {i}' for i in range(n)]),
      embeddings=np.eye(n, 384, dtype=np.float32), attributes=None)
  return pipeline.SplitData('train', _FakeSource(n), table)


def _stream(split, batch=4, process_index=0, process_count=1, seed=0):
  return pipeline.TrainStream(split, global_batch_size=batch,
                              shuffle_seed=seed, process_index=process_index,
                              process_count=process_count)


def test_each_epoch_is_a_permutation_and_epochs_differ():
  stream = _stream(_split(10))
  first, second = stream.global_indices(0, 10), stream.global_indices(10, 10)
  assert sorted(first) == list(range(10)) == sorted(second)
  assert list(first) != list(second)


def test_images_and_targets_match_indices():
  split = _split(10)
  batch = _stream(split).batch_at(0)
  np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['index'])
  np.testing.assert_array_equal(batch['embedding'].argmax(1), batch['index'])


def test_resume_from_offset_continues_the_same_stream():
  split = _split(10)
  straight = _stream(split).iterate(0)
  whole = [next(straight)['index'] for _ in range(6)]  # Crosses 2 epochs.
  resumed = _stream(split).iterate(3 * 4)
  for expected in whole[3:]:
    np.testing.assert_array_equal(next(resumed)['index'], expected)


def test_processes_read_disjoint_rows_of_the_same_global_batch():
  split = _split(10)
  global_batch = _stream(split, batch=4).batch_at(8)['index']
  parts = [_stream(split, batch=4, process_index=p, process_count=2)
           .batch_at(8)['index'] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), global_batch)


def test_shuffle_seed_changes_order():
  split = _split(10)
  a = _stream(split, seed=0).global_indices(0, 10)
  b = _stream(split, seed=1).global_indices(0, 10)
  assert list(a) != list(b)


def test_eval_batches_pad_and_mask_the_last_batch():
  batches = list(pipeline.eval_batches(_split(10), global_batch_size=4,
                                       process_index=0, process_count=1,
                                       image_shape=(4, 4, 3)))
  assert len(batches) == 3
  last = batches[-1]
  np.testing.assert_array_equal(last['mask'], [1, 1, 0, 0])
  np.testing.assert_array_equal(last['index'], [8, 9, -1, -1])
  assert not last['image'][2:].any()


def test_batch_not_divisible_by_processes_is_refused():
  with pytest.raises(ValueError, match='not divisible by 3 processes'):
    _stream(_split(10), batch=4, process_count=3)


def test_empty_split_is_refused():
  table = targets.SplitTable(np.array([], str), np.array([], str),
                             np.zeros((0, 384), np.float32), None)
  with pytest.raises(ValueError, match='empty'):
    pipeline.SplitData('test', _FakeSource(0), table)
