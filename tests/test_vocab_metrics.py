"""Tests for reverse_sd.vocab_metrics against hand-computed values."""

import numpy as np
import pytest

from reverse_sd import vocab_metrics

# Three examples over V = 5 words. Example 2 has no true word and is skipped
# by every metric.
SCORES = np.array([[0.9, 0.8, 0.1, 0.7, 0.0],
                   [0.1, 0.2, 0.9, 0.3, 0.8],
                   [0.5, 0.4, 0.3, 0.2, 0.1]])
LABELS = np.array([[1, 0, 0, 1, 0],
                   [1, 0, 0, 0, 1],
                   [0, 0, 0, 0, 0]], np.uint8)
# Rankings by decreasing score:
#   example 0: words 0, 1, 3, 2, 4 -> labels 1, 0, 1, 0, 0
#   example 1: words 2, 4, 3, 1, 0 -> labels 0, 1, 0, 0, 1


def test_topk_precision_recall_f1_k2():
  # Example 0: top-2 = {0, 1}, true = {0, 3}: hits 1, P = 1/2, R = 1/2,
  #   F1 = 2 * 1/4 / 1 = 1/2.
  # Example 1: top-2 = {2, 4}, true = {0, 4}: hits 1, P = 1/2, R = 1/2,
  #   F1 = 1/2.
  result = vocab_metrics.topk_precision_recall_f1(SCORES, LABELS, k=2)
  assert result == pytest.approx({'precision': 0.5, 'recall': 0.5, 'f1': 0.5})


def test_topk_precision_recall_f1_k3_unequal_true_counts():
  labels = LABELS.copy()
  labels[1] = [1, 1, 0, 0, 1]
  # Example 0: top-3 = {0, 1, 3}, true = {0, 3}: hits 2, P = 2/3, R = 1,
  #   F1 = 2 * (2/3) / (5/3) = 4/5.
  # Example 1: top-3 = {2, 4, 3}, true = {0, 1, 4}: hits 1, P = 1/3, R = 1/3,
  #   F1 = 1/3.
  # Macro: P = (2/3 + 1/3) / 2 = 1/2, R = (1 + 1/3) / 2 = 2/3,
  #   F1 = (4/5 + 1/3) / 2 = 17/30.
  result = vocab_metrics.topk_precision_recall_f1(SCORES, labels, k=3)
  assert result == pytest.approx(
      {'precision': 1 / 2, 'recall': 2 / 3, 'f1': 17 / 30})


def test_topk_f1_is_zero_when_no_hit():
  # Top-1 = word 0, true = word 4: P = R = 0 -> F1 = 0 (not NaN).
  result = vocab_metrics.topk_precision_recall_f1(
      [[1.0, 0.0, 0.0, 0.0, 0.5]], [[0, 0, 0, 0, 1]], k=1)
  assert result == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0}


def test_topk_ties_rank_the_lower_word_index_first():
  # All scores tie: top-2 = words {0, 1}; true = {1, 2}: hits 1.
  result = vocab_metrics.topk_precision_recall_f1(
      np.zeros((1, 4)), [[0, 1, 1, 0]], k=2)
  assert result['precision'] == 0.5


def test_topk_without_any_true_word_is_nan():
  result = vocab_metrics.topk_precision_recall_f1(
      SCORES[2:], LABELS[2:], k=1)
  assert all(np.isnan(v) for v in result.values())


@pytest.mark.parametrize('k', [0, 6, 1.5])
def test_topk_rejects_bad_k(k):
  with pytest.raises(ValueError, match='k must be an int'):
    vocab_metrics.topk_precision_recall_f1(SCORES, LABELS, k=k)


def test_metrics_reject_bad_shapes_and_labels():
  with pytest.raises(ValueError, match='shapes'):
    vocab_metrics.mean_average_precision(SCORES, LABELS[:2])
  with pytest.raises(ValueError, match='0/1'):
    vocab_metrics.mean_average_precision(SCORES, LABELS * 2)


def test_mean_average_precision():
  # Example 0: ranked labels 1, 0, 1, 0, 0: true at ranks 1 and 3,
  #   AP = (1/1 + 2/3) / 2 = 5/6.
  # Example 1: ranked labels 0, 1, 0, 0, 1: true at ranks 2 and 5,
  #   AP = (1/2 + 2/5) / 2 = 9/20.
  # Example 2 has no true word: skipped. mAP = (5/6 + 9/20) / 2 = 77/120.
  assert vocab_metrics.mean_average_precision(SCORES, LABELS) == (
      pytest.approx(77 / 120))


def test_mean_average_precision_perfect_ranking_is_one():
  assert vocab_metrics.mean_average_precision(LABELS[:2], LABELS[:2]) == 1.0


def test_retrieval_recall_at_k_hand_computed():
  bank = np.array([[1.0, 0.0],
                   [0.0, 1.0],
                   [1.0, 1.0],
                   [-1.0, 0.0]])
  # Prediction 0, (2, 0): cosines to the bank rows 1, 0, 0.707, -1.
  #   True row 0 has the highest cosine: 0 rows above -> retrieved at 1, 2, 3.
  # Prediction 1, (1, 0.1): cosines 0.995, 0.0995, 0.774, -0.995.
  #   True row 1: rows 0 and 2 are higher (2 above) -> retrieved at k = 3 only.
  # Prediction 2, (0, 5): cosines 0, 1, 0.707, 0.
  #   True row 2: row 1 is higher (1 above) -> retrieved at k = 2, 3.
  pred = np.array([[2.0, 0.0], [1.0, 0.1], [0.0, 5.0]])
  result = vocab_metrics.retrieval_recall_at_k(
      pred, bank, [0, 1, 2], ks=(1, 2, 3))
  assert result == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_retrieval_ties_do_not_push_the_true_row_out():
  # Rows 0 and 1 are identical: the prediction ties on both, nothing scores
  # strictly higher than true row 1 -> retrieved at k = 1.
  bank = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  result = vocab_metrics.retrieval_recall_at_k(
      [[3.0, 0.0]], bank, [1], ks=(1,))
  assert result == {1: 1.0}


def test_retrieval_chunked_equals_unchunked():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(50, 8))
  true_index = rng.integers(0, 50, size=37)
  pred = bank[true_index] + rng.normal(scale=1.0, size=(37, 8))
  ks = (1, 5, 10, 100)
  unchunked = vocab_metrics.retrieval_recall_at_k(
      pred, bank, true_index, ks=ks, chunk_size=1000)
  chunked = vocab_metrics.retrieval_recall_at_k(
      pred, bank, true_index, ks=ks, chunk_size=4)
  assert chunked == unchunked
  assert 0.0 < unchunked[1] < 1.0, 'the random case should not be trivial'
  assert unchunked[100] == 1.0


def test_retrieval_rejects_out_of_range_true_index():
  with pytest.raises(ValueError, match=r'true_index must lie in \[0, M=2\)'):
    vocab_metrics.retrieval_recall_at_k(
        np.ones((1, 3)), np.ones((2, 3)), [2], ks=(1,))


def test_most_frequent_words_baseline():
  train_labels = np.array([[1, 0, 1],
                           [1, 0, 0],
                           [1, 1, 0],
                           [0, 0, 1]], np.uint8)
  # Training frequencies: word 0 in 3/4 prompts, word 1 in 1/4, word 2 in 2/4.
  scores = vocab_metrics.most_frequent_words_baseline(train_labels, 2)
  np.testing.assert_allclose(scores, [[0.75, 0.25, 0.5]] * 2)
  # Its F1@1 on eval labels: it always predicts word 0.
  # Eval 0: true {0, 1}: hits 1, P = 1, R = 1/2, F1 = 2/3.
  # Eval 1: true {2}: hits 0, F1 = 0. Macro F1 = 1/3.
  eval_labels = np.array([[1, 1, 0], [0, 0, 1]])
  result = vocab_metrics.topk_precision_recall_f1(scores, eval_labels, k=1)
  assert result['f1'] == pytest.approx(1 / 3)


def test_group_recall_matches_hand_computed_values():
  # Columns 0-2 are one group (colours), 3-4 another (shapes).
  scores = np.array([[0.9, 0.1, 0.5, 0.2, 0.8],
                     [0.1, 0.9, 0.8, 0.7, 0.6]])
  labels = np.array([[1, 0, 1, 0, 1],
                     [0, 0, 1, 0, 0]])
  out = vocab_metrics.group_recall(scores, labels,
                                   {'colour': [0, 1, 2], 'shape': [3, 4],
                                    'empty': []})
  # Row 0: 2 true colours {0, 2}; top-2 colours by score are {0, 2}: 1.0.
  # Row 1: 1 true colour {2}; top-1 colour is 1: 0.0. Mean 0.5.
  assert out['colour']['recall'] == pytest.approx(0.5)
  assert out['colour']['chance'] == pytest.approx((2 / 3 + 1 / 3) / 2)
  assert out['colour']['num_examples'] == 2
  # Only row 0 has a shape word (4), ranked first: 1.0; chance 1/2.
  assert out['shape'] == {'recall': 1.0, 'chance': 0.5, 'num_examples': 1}
  assert 'empty' not in out
  # A prior that ranks column 1 first, then 2, then 0, for every example:
  # row 0 top-2 colours {1, 2} hold 1 of {0, 2}: 0.5; row 1 top-1 {1}: 0.
  out = vocab_metrics.group_recall(scores, labels, {'colour': [0, 1, 2]},
                                   prior_V=np.array([0.1, 0.9, 0.5, 0, 0]))
  assert out['colour']['prior_recall'] == pytest.approx(0.25)
