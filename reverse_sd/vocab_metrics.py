"""Evaluation metrics of the vocabulary head and of prompt retrieval (numpy).

Whole-set metrics computed on host arrays after the eval loop:

  * `topk_precision_recall_f1`: precision, recall and F1 of the top-k words.
  * `mean_average_precision`: mean over examples of the average precision of
    the ranking of all V words.
  * `retrieval_recall_at_k`: whether the true prompt's embedding is among the
    k nearest rows of a prompt bank, by cosine.
  * `most_frequent_words_baseline`: scores of the predict-the-most-frequent-
    words baseline, to report its F1@k next to the model's.
  * `group_recall`: per group of words (colour, shape, ...), the recall of
    the group's true words among the head's top words of that group.

Rankings of words break ties by word index, lower first (a stable sort), so a
result never depends on the sorting algorithm. With a vocabulary built by
`reverse_sd.text.vocab.Vocabulary.build`, a lower index is a more frequent
training word. Examples without any true word carry no information about
precision or recall and are left out of every average here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Rows sorted at once: bounds the [rows, V] int64 sort buffers.
_RANKING_CHUNK = 4096


def _check_scores_and_labels(scores_NxV, labels_NxV):
  """float64 scores and bool labels, both [N, V]; clear errors otherwise."""
  scores_NxV = np.asarray(scores_NxV)
  labels_NxV = np.asarray(labels_NxV)
  if scores_NxV.ndim != 2 or scores_NxV.shape != labels_NxV.shape:
    raise ValueError(
        f'scores and labels must both be [N, V]; got shapes '
        f'{scores_NxV.shape} and {labels_NxV.shape}')
  scores_NxV = scores_NxV.astype(np.float64)
  if np.isnan(scores_NxV).any():
    raise ValueError('scores contain NaN')
  if not np.isin(labels_NxV, (0, 1)).all():
    raise ValueError('labels must be 0/1 (multi-hot)')
  return scores_NxV, labels_NxV.astype(bool)


def _ranked_labels(scores_NxV, labels_NxV):
  """Yields labels reordered by decreasing score, chunk of rows by chunk.

  Ties are broken by word index, lower first.
  """
  for start in range(0, scores_NxV.shape[0], _RANKING_CHUNK):
    stop = start + _RANKING_CHUNK
    order = np.argsort(-scores_NxV[start:stop], axis=1, kind='stable')
    yield np.take_along_axis(labels_NxV[start:stop], order, axis=1)


def topk_precision_recall_f1(scores_NxV, labels_NxV,
                             k: int) -> dict[str, float]:
  """Precision, recall and F1 of the top-k words, macro over examples.

  For each example with at least one true word, with hits = |top-k ∩ true|:
  precision = hits / k, recall = hits / |true|, F1 = 2PR / (P + R), or 0 when
  P = R = 0. Each is then averaged over those examples; examples with no true
  word are skipped. Ties in the scores are broken by word index, lower first.

  Args:
    scores_NxV: real scores (logits or probabilities), higher = more likely.
    labels_NxV: 0/1 true words, e.g. `Vocabulary.multi_hot`.
    k: words predicted per example, 1 <= k <= V.

  Returns:
    {'precision', 'recall', 'f1'}; all NaN when no example has a true word.
  """
  scores_NxV, labels_NxV = _check_scores_and_labels(scores_NxV, labels_NxV)
  num_words = scores_NxV.shape[1]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
      1 <= k <= num_words):
    raise ValueError(f'k must be an int in [1, V={num_words}], got {k!r}')
  has_true = labels_NxV.any(axis=1)
  scores_NxV, labels_NxV = scores_NxV[has_true], labels_NxV[has_true]
  if not labels_NxV.shape[0]:
    return {'precision': float('nan'), 'recall': float('nan'),
            'f1': float('nan')}
  hits_N = np.concatenate([ranked[:, :k].sum(axis=1) for ranked in
                           _ranked_labels(scores_NxV, labels_NxV)])
  precision_N = hits_N / k
  recall_N = hits_N / labels_NxV.sum(axis=1)
  total_N = precision_N + recall_N
  f1_N = np.divide(2 * precision_N * recall_N, total_N,
                   out=np.zeros_like(total_N), where=total_N > 0)
  return {'precision': float(precision_N.mean()),
          'recall': float(recall_N.mean()),
          'f1': float(f1_N.mean())}


def mean_average_precision(scores_NxV, labels_NxV) -> float:
  """Mean over examples of the average precision of the full word ranking.

  Per example, with words ranked by decreasing score (ties: lower index
  first), AP = mean over the true words of precision@(rank of that word).
  Examples with no true word are skipped; NaN when none has one.
  """
  scores_NxV, labels_NxV = _check_scores_and_labels(scores_NxV, labels_NxV)
  has_true = labels_NxV.any(axis=1)
  scores_NxV, labels_NxV = scores_NxV[has_true], labels_NxV[has_true]
  if not labels_NxV.shape[0]:
    return float('nan')
  ranks_V = np.arange(1, scores_NxV.shape[1] + 1)
  average_precisions = []
  for ranked in _ranked_labels(scores_NxV, labels_NxV):
    precision_at_rank = np.cumsum(ranked, axis=1) / ranks_V
    average_precisions.append(
        (precision_at_rank * ranked).sum(axis=1) / ranked.sum(axis=1))
  return float(np.concatenate(average_precisions).mean())


def _unit_rows(vectors_NxD, dtype):
  """Rows scaled to unit L2 norm; all-zero rows stay zero (cosine 0)."""
  norms = np.linalg.norm(vectors_NxD, axis=1, keepdims=True)
  return (vectors_NxD / np.maximum(norms, np.finfo(dtype).tiny)).astype(dtype)


def retrieval_recall_at_k(pred_NxD, bank_MxD, true_index_N,
                          ks: Iterable[int] = (1, 5, 10),
                          chunk_size: int = 1024) -> dict[int, float]:
  """Share of predictions whose true bank row is among the k nearest by cosine.

  Both predictions and bank rows are L2-normalised, so the dot product is the
  cosine. Ties: the true row counts as retrieved at k only if strictly fewer
  than k bank rows score higher than it (rows that tie with it do not push it
  out). Predictions are processed `chunk_size` rows at a time, so a 20k x 20k
  evaluation needs a [chunk_size, M] similarity block, not [N, M].

  Args:
    pred_NxD: predicted embeddings.
    bank_MxD: candidate embeddings (e.g. MiniLM embeddings of eval prompts).
    true_index_N: for each prediction, the row of `bank_MxD` it should find.
    ks: the cut-offs; k >= M gives recall 1.
    chunk_size: prediction rows per similarity block.

  Returns:
    {k: recall@k} for each k in `ks`.
  """
  pred_NxD = np.asarray(pred_NxD)
  bank_MxD = np.asarray(bank_MxD)
  true_index_N = np.asarray(true_index_N)
  if (pred_NxD.ndim != 2 or bank_MxD.ndim != 2
      or pred_NxD.shape[1] != bank_MxD.shape[1]):
    raise ValueError(
        f'predictions and bank must be [N, D] and [M, D]; got shapes '
        f'{pred_NxD.shape} and {bank_MxD.shape}')
  num_pred, num_bank = pred_NxD.shape[0], bank_MxD.shape[0]
  if not num_pred or not num_bank:
    raise ValueError(f'need at least one prediction and one bank row; got '
                     f'N={num_pred}, M={num_bank}')
  if (true_index_N.shape != (num_pred,)
      or not np.issubdtype(true_index_N.dtype, np.integer)):
    raise ValueError(f'true_index must be {num_pred} ints, got shape '
                     f'{true_index_N.shape} dtype {true_index_N.dtype}')
  if true_index_N.min() < 0 or true_index_N.max() >= num_bank:
    raise ValueError(f'true_index must lie in [0, M={num_bank}); got '
                     f'[{true_index_N.min()}, {true_index_N.max()}]')
  ks = tuple(ks)
  if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer))
                   or k < 1 for k in ks):
    raise ValueError(f'ks must be positive ints, got {ks!r}')
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or (
      chunk_size < 1):
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}')

  # float32 halves the similarity block; float64 inputs stay float64.
  dtype = np.result_type(pred_NxD.dtype, bank_MxD.dtype, np.float32)
  pred_NxD = _unit_rows(pred_NxD, dtype)
  bank_MxD = _unit_rows(bank_MxD, dtype)
  num_higher_N = np.empty(num_pred, np.int64)
  for start in range(0, num_pred, chunk_size):
    stop = min(start + chunk_size, num_pred)
    sims_CxM = pred_NxD[start:stop] @ bank_MxD.T
    # The true score is read from the same block, so it is compared with
    # itself bit for bit and never counts as higher than itself.
    true_sims_C = sims_CxM[np.arange(stop - start), true_index_N[start:stop]]
    num_higher_N[start:stop] = (sims_CxM > true_sims_C[:, None]).sum(axis=1)
  return {int(k): float((num_higher_N < k).mean()) for k in ks}


def most_frequent_words_baseline(train_labels_NxV,
                                 num_examples: int) -> np.ndarray:
  """Scores of the baseline that predicts the most frequent training words.

  Every example gets the same scores: the share of training prompts that
  contain each word. Feed them to `topk_precision_recall_f1` with the eval
  labels to report the baseline's F1@k. Ties rank the lower word index first,
  which for a `Vocabulary.build` vocabulary built on the same training
  prompts is the vocabulary order.

  Args:
    train_labels_NxV: 0/1 multi-hot labels of the TRAINING prompts.
    num_examples: rows of the returned scores (the number of eval examples).

  Returns:
    float64 [num_examples, V], a read-only broadcast view (no copy per row).
  """
  train_labels_NxV = np.asarray(train_labels_NxV)
  if train_labels_NxV.ndim != 2 or not train_labels_NxV.shape[0]:
    raise ValueError(f'train labels must be [N, V] with N >= 1, got shape '
                     f'{train_labels_NxV.shape}')
  if not np.isin(train_labels_NxV, (0, 1)).all():
    raise ValueError('train labels must be 0/1 (multi-hot)')
  if isinstance(num_examples, bool) or not isinstance(
      num_examples, (int, np.integer)) or num_examples < 0:
    raise ValueError(
        f'num_examples must be a non-negative int, got {num_examples!r}')
  frequency_V = train_labels_NxV.mean(axis=0, dtype=np.float64)
  return np.broadcast_to(frequency_V, (num_examples, train_labels_NxV.shape[1]))


def group_recall(scores_NxV, labels_NxV, groups: dict[str, Iterable[int]],
                 prior_V=None) -> dict[str, dict[str, float]]:
  """Per word group (e.g. colour words), how well the head names its words.

  For each group of vocabulary columns and each example with t >= 1 true
  words in the group, the head's top-t words among the group's columns are
  taken; the recall is the share of the t true words among them, averaged
  over those examples. `chance` is the same for a random ranking of the
  group (t / group size, averaged). With `prior_V` (e.g. each word's share
  of the training prompts), `prior_recall` is the recall of ranking every
  example's group words by that prior: what a model that sees nothing gets
  from word frequencies alone. A group whose words leave no trace in the
  image sits at `prior_recall`.

  Returns:
    group -> {'recall', 'chance', 'num_examples'[, 'prior_recall']}; groups
    with no example that has one of their words are left out.
  """
  scores_NxV, labels_NxV = _check_scores_and_labels(scores_NxV, labels_NxV)
  out = {}
  for name, columns in groups.items():
    columns = np.asarray(sorted(set(int(c) for c in columns)), np.int64)
    if not len(columns):
      continue
    labels = labels_NxV[:, columns]
    num_true = labels.sum(axis=1)
    has = num_true > 0
    if not has.any():
      continue
    ranked = np.concatenate(list(_ranked_labels(scores_NxV[has][:, columns],
                                                labels[has])))
    positions = np.arange(len(columns))[None, :]
    hits = (ranked & (positions < num_true[has][:, None])).sum(axis=1)
    out[name] = {'recall': float(np.mean(hits / num_true[has])),
                 'chance': float(np.mean(num_true[has] / len(columns))),
                 'num_examples': int(has.sum())}
    if prior_V is not None:
      prior = np.broadcast_to(np.asarray(prior_V, np.float64),
                              scores_NxV.shape)
      out[name]['prior_recall'] = group_recall(
          prior, labels_NxV, {name: columns})[name]['recall']
  return out
