"""Evaluation: model predictions per split, and the reference scores.

For each split: `cosine` (the model's mean cosine to the true embedding),
`baseline_cosine` (predicting the mean training embedding) and, when the data
set carries ground-truth attributes, `oracle_cosine` (ridge regression from
the multi-hot rendered attributes to the embedding, fitted on train with the
ridge strength chosen on validation: perfect perception, linear read-out).

A model that reads per-example caption contexts (the white-box backbone with
sd_context='caption') gets them from the split (`SplitData.context`); a
split loaded without them (analysis of a restored run) has them computed
here, once, by `feature_cache.caption_contexts`.
"""

from collections.abc import Callable, Sequence
import dataclasses
import logging
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from reverse_sd import feature_cache
from reverse_sd import sharding
from reverse_sd import vocab_metrics
from reverse_sd.data import pipeline
from reverse_sd.models import whitebox


# Batch keys the model reads (`model_inputs`); the rest are targets.
INPUT_KEYS = ('image', 'features', 'context')
# Attribute of `make_predict_step`'s function: the SD folder whose text
# encoder makes the per-example contexts the model reads ('' if none).
CAPTION_SOURCE_ATTR = 'caption_encoder_dir'


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  """The model's keyword inputs of a batch: images, or cached features, and
  the per-example context when the batch carries one."""
  if 'features' in batch:
    inputs = {'features': batch['features']}
  else:
    inputs = {'images_BxHxWx3': batch['image']}
  if 'context' in batch:
    inputs['context'] = batch['context']
  return inputs


def caption_encoder_dir(model) -> str:
  """The SD folder whose text encoder makes the per-example contexts that
  `model` reads (sd_context='caption'), or '' for a model that reads none."""
  backbone = getattr(model, 'backbone', None)
  if isinstance(backbone, whitebox.WhiteBoxBackbone) and (
      backbone.context is None):
    return backbone.caption_encoder_dir
  return ''


# Per-device micro-batch of the predict step on CPU backends when
# config.eval.micro_batch is -1 (`resolve_micro_batch`).
CPU_MICRO_BATCH = 256


def resolve_micro_batch(micro_batch: int) -> int:
  """config.eval.micro_batch -> examples per device per forward pass.

  -1 (auto): `CPU_MICRO_BATCH` on CPU and 0 on accelerators. 0 runs the
  whole per-device batch at once. On CPU each micro-batch costs a fixed
  overhead (the ops' thread hand-offs), so larger ones run faster: the
  default ConvNet's batch of 256 predicted 1.39x faster at once than in
  micro-batches of 32 (`benchmarks/ab_step.py --change=micro_batch
  --micro_batch=32`; `benchmarks/RESULTS.md`). The cap bounds the memory of
  one pass: XLA's temporaries are 0.19 MB per image for that ConvNet and
  5.2 MB for ViT-B/16 at 224 px, 1.3 GB for 256 (the command in
  RESULTS.md).
  """
  micro_batch = int(micro_batch)
  if micro_batch < -1:
    raise ValueError(f'eval.micro_batch={micro_batch}: expected -1 (auto), 0 '
                     '(the whole batch) or a positive size.')
  if micro_batch == -1:
    return CPU_MICRO_BATCH if jax.default_backend() == 'cpu' else 0
  return micro_batch


def chunk_size(per_device: int, micro_batch: int) -> int:
  """The largest divisor of `per_device` that is at most `micro_batch`."""
  if micro_batch <= 0 or micro_batch >= per_device:
    return per_device
  return max(d for d in range(1, micro_batch + 1) if per_device % d == 0)


def make_predict_step(model, mesh: Mesh, params_shardings: Any,
                      micro_batch: int = -1) -> Callable:
  """Jitted (params, {'image' or 'features'[, 'context']: batch}) -> unit-norm
  embeddings (and word logits), sharded by batch.

  With a `micro_batch` (`resolve_micro_batch`), each device runs its share
  of the batch in chunks of at most that many examples, one after another
  (`jax.lax.map`). Every chunk takes rows from every device, so no data
  moves between devices; the outputs are those of the whole batch.

  The function's `caption_encoder_dir` attribute (`CAPTION_SOURCE_ATTR`)
  names the SD folder of the contexts the model reads ('' if none).
  """
  batch_sharding = sharding.batch_sharding(mesh)
  chunk_sharding = NamedSharding(mesh, P(None, sharding.batch_axes(mesh)))
  data_size = sharding.batch_shards(mesh)
  micro_batch = resolve_micro_batch(micro_batch)

  def forward(params, inputs):
    out = model.apply({'params': params}, **model_inputs(inputs))
    return {k: out[k] for k in ('embedding', 'word_logits') if k in out}

  def predict(params, inputs):
    per_device = jax.tree.leaves(inputs)[0].shape[0] // data_size
    chunk = chunk_size(per_device, micro_batch)
    if chunk == per_device:
      return forward(params, inputs)
    count = per_device // chunk

    def split(x):  # [D*count*chunk, ...] -> [count, D*chunk, ...]
      x = x.reshape(data_size, count, chunk, *x.shape[1:])
      return jnp.swapaxes(x, 0, 1).reshape(count, data_size * chunk,
                                           *x.shape[3:])

    def merge(y):  # [count, D*chunk, ...] -> [D*count*chunk, ...]
      y = y.reshape(count, data_size, chunk, *y.shape[2:])
      return jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[3:])

    chunks = jax.lax.with_sharding_constraint(
        jax.tree.map(split, inputs), chunk_sharding)
    outs = jax.lax.map(lambda c: jax.lax.with_sharding_constraint(
        forward(params, c), batch_sharding), chunks)
    return jax.tree.map(merge, outs)

  step = jax.jit(predict, in_shardings=(params_shardings, batch_sharding),
                 out_shardings=batch_sharding)
  setattr(step, CAPTION_SOURCE_ATTR, caption_encoder_dir(model))
  return step


def predict_split(predict_step: Callable, params: Any,
                  split: pipeline.SplitData, *, mesh: Mesh,
                  global_batch_size: int) -> dict[str, np.ndarray]:
  """Model outputs of a split in data-source order: 'embedding' [N, D] and,
  with a vocabulary head, 'word_logits' [N, V].

  A model that reads caption contexts, given a split without them, gets them
  from `feature_cache.caption_contexts` (computed once and cached under
  `$REVERSE_SD_CACHE_DIR`; see `feature_cache.caption_cache_root`).
  """
  sharding.check_batch_divisible(global_batch_size, mesh)
  encoder_dir = getattr(predict_step, CAPTION_SOURCE_ATTR, '')
  if encoder_dir and split.context is None:
    split = dataclasses.replace(split, context=feature_cache.caption_contexts(
        encoder_dir, split, feature_cache.caption_cache_root()))
  preds = {}
  for batch in pipeline.eval_batches(
      split, global_batch_size=global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count()):
    inputs = sharding.host_to_global(
        {k: batch[k] for k in INPUT_KEYS if k in batch}, mesh)
    index = sharding.host_to_global({'index': batch['index']}, mesh)['index']
    out = multihost_utils.process_allgather(predict_step(params, inputs),
                                            tiled=True)
    index = multihost_utils.process_allgather(index, tiled=True)
    valid = index >= 0
    for key, value in out.items():
      if key not in preds:
        preds[key] = np.zeros((len(split), *value.shape[1:]), np.float32)
      preds[key][index[valid]] = value[valid]
  return preds


def mean_cosine(pred_NxD: np.ndarray, target_NxD: np.ndarray) -> float:
  """Mean row-wise cosine similarity (float64 accumulation)."""
  pred = pred_NxD.astype(np.float64)
  target = target_NxD.astype(np.float64)
  dot = np.sum(pred * target, axis=1)
  norms = np.linalg.norm(pred, axis=1) * np.linalg.norm(target, axis=1)
  return float(np.mean(dot / np.maximum(norms, 1e-12)))


def fit_ridge(x_NxA: np.ndarray, y_NxD: np.ndarray, alpha: float) -> np.ndarray:
  """Closed-form ridge with an unpenalised bias column; returns [A+1, D]."""
  x = np.concatenate([x_NxA.astype(np.float64),
                      np.ones((len(x_NxA), 1))], axis=1)
  penalty = alpha * np.eye(x.shape[1])
  penalty[-1, -1] = 0.0
  return np.linalg.solve(x.T @ x + penalty, x.T @ y_NxD.astype(np.float64))


def apply_ridge(weights: np.ndarray, x_NxA: np.ndarray) -> np.ndarray:
  return x_NxA.astype(np.float64) @ weights[:-1] + weights[-1]


def fit_oracle(train: pipeline.SplitData, validation: pipeline.SplitData,
               alphas: Sequence[float]) -> tuple[np.ndarray, float]:
  """Ridge from attributes to embeddings; alpha chosen by validation cosine."""
  best = None
  for alpha in alphas:
    weights = fit_ridge(train.table.attributes, train.table.embeddings, alpha)
    score = mean_cosine(apply_ridge(weights, validation.table.attributes),
                        validation.table.embeddings)
    if best is None or score > best[2]:
      best = (weights, alpha, score)
  return best[0], best[1]


def reference_scores(splits: dict[str, pipeline.SplitData],
                     eval_splits: Sequence[str],
                     oracle_alphas: Sequence[float]) -> dict[str, dict]:
  """baseline_cosine (and oracle_cosine, with attributes) per eval split."""
  train = splits['train']
  mean_embedding = train.table.embeddings.mean(axis=0, keepdims=True)
  has_attributes = all(s.table.attributes is not None
                       for s in splits.values())
  oracle = None
  if has_attributes and 'validation' in splits:
    oracle = fit_oracle(train, splits['validation'], oracle_alphas)
  out = {}
  for name in eval_splits:
    target = splits[name].table.embeddings
    scores = {'baseline_cosine': mean_cosine(
        np.broadcast_to(mean_embedding, target.shape), target)}
    if oracle is not None:
      weights, alpha = oracle
      scores['oracle_cosine'] = mean_cosine(
          apply_ridge(weights, splits[name].table.attributes), target)
      scores['oracle_alpha'] = alpha
    out[name] = scores
  return out


def evaluate_model(predict_step: Callable, params: Any,
                   splits: dict[str, pipeline.SplitData],
                   eval_splits: Sequence[str], *, mesh: Mesh,
                   global_batch_size: int,
                   word_groups: dict[str, Sequence[int]] | None = None
                   ) -> dict[str, dict]:
  """`cosine`, prompt retrieval `recall@k` and `num_examples` per split.

  With a vocabulary head, also its word metrics (`vocabulary_scores`) and,
  given `word_groups` (group name -> vocabulary columns), the per-group
  recall under 'word_groups'.
  """
  out = {}
  for name in eval_splits:
    start = time.time()
    outputs = predict_split(predict_step, params, splits[name], mesh=mesh,
                            global_batch_size=global_batch_size)
    preds, targets = outputs['embedding'], splits[name].table.embeddings
    out[name] = {'cosine': mean_cosine(preds, targets),
                 'num_examples': len(splits[name])}
    # Retrieval: rank all of the split's prompts by cosine to the prediction.
    recall = vocab_metrics.retrieval_recall_at_k(
        preds, targets, np.arange(len(targets)), ks=(1, 5, 10))
    out[name].update({f'recall@{k}': v for k, v in recall.items()})
    if 'word_logits' in outputs and splits[name].labels is not None:
      out[name].update(vocabulary_scores(outputs['word_logits'],
                                         splits[name].labels,
                                         splits['train'].labels))
      if word_groups:
        out[name]['word_groups'] = vocab_metrics.group_recall(
            outputs['word_logits'], splits[name].labels, word_groups,
            prior_V=splits['train'].labels.mean(axis=0))
    logging.info('Evaluated %s: cosine %.4f (%d examples, %.1f s)', name,
                 out[name]['cosine'], len(splits[name]), time.time() - start)
  return out


def vocabulary_scores(word_logits_NxV: np.ndarray, labels_NxV: np.ndarray,
                      train_labels_MxV: np.ndarray) -> dict[str, float]:
  """Top-k word precision/recall/F1 and mAP of the vocabulary head, and the
  F1@10 of predicting the most frequent training words for every image."""
  scores = {}
  for k in (5, 10):
    topk = vocab_metrics.topk_precision_recall_f1(word_logits_NxV, labels_NxV,
                                                  k)
    scores.update({f'vocab_{name}@{k}': value for name, value in topk.items()})
  scores['vocab_map'] = vocab_metrics.mean_average_precision(word_logits_NxV,
                                                             labels_NxV)
  baseline = vocab_metrics.most_frequent_words_baseline(train_labels_MxV,
                                                        len(labels_NxV))
  scores['vocab_f1@10_frequent_words'] = vocab_metrics.topk_precision_recall_f1(
      baseline, labels_NxV, 10)['f1']
  return scores


def gap_closed(scores: dict[str, float]) -> float | None:
  """Share of the baseline-to-oracle gap that the model closes."""
  if 'oracle_cosine' not in scores:
    return None
  gap = scores['oracle_cosine'] - scores['baseline_cosine']
  return (scores['cosine'] - scores['baseline_cosine']) / gap if gap else None
