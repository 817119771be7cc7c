r"""Analyses a trained run on one split: a predictions file and an HTML report.

  python -m reverse_sd.analyze --workdir=RUN_DIR [--step=N] [--split=test] \
      [--output_dir=RUN_DIR/analysis] [--num_examples=8] [--top_k=5]

Restores the checkpoint (the latest, or --step) with the run's config,
predicts the split and writes, atomically, into --output_dir:

  predictions_<split>_step<N>.npz   ids, prompts, predicted and true
                                    embeddings, per-example cosine and
                                    retrieval rank; word scores (sigmoid) and
                                    the vocabulary when the run has the head.
  report_<split>_step<N>.html       one self-contained page (images inlined
                                    as PNG, no script, no external link):
                                    metrics, training curves from the run's
                                    TensorBoard events, the best and worst
                                    examples, and per-word precision/recall.

Prints a JSON summary (the two paths and the split's metrics) on stdout.
"""

from collections.abc import Sequence
import base64
import dataclasses
import datetime
import html
import io
import json
import logging
import os
import pathlib
import sys

import jax
import numpy as np

from reverse_sd import evaluate
from reverse_sd import prediction_cache
from reverse_sd import saved_run
from reverse_sd import vocab_metrics
from reverse_sd.data import datasets
from reverse_sd.data import pipeline
from reverse_sd.data import preprocess
from reverse_sd.data import synthetic_grammar
from reverse_sd.ops.cpu import tuning
from reverse_sd.text import prompt_bank as prompt_bank_lib

# Scalar tags left out of the training curves: final scores are single points
# (they are in the metric table) and uptime is not a curve of interest.
_SKIPPED_CURVE_PREFIXES = ('final/', 'uptime')


@dataclasses.dataclass(frozen=True)
class SplitAnalysis:
  """Predictions and scores of one split."""
  name: str
  split: pipeline.SplitData
  predicted_NxD: np.ndarray
  cosine_N: np.ndarray
  # 1 + the number of the split's prompts nearer to the prediction than the
  # true one (1: retrieved first).
  retrieval_rank_N: np.ndarray
  metrics: dict
  word_scores_NxV: np.ndarray | None  # Sigmoid of the word logits.
  labels_NxV: np.ndarray | None  # True words, multi-hot.


# ----------------------------------------------------------------------------
# Predicting and scoring.


def retrieval_ranks(pred_NxD: np.ndarray, bank_NxD: np.ndarray,
                    chunk_size: int = 1024) -> np.ndarray:
  """Rank of row i of the bank among all rows by cosine to prediction i."""
  pred = pred_NxD / np.maximum(
      np.linalg.norm(pred_NxD, axis=1, keepdims=True), 1e-12)
  bank = bank_NxD / np.maximum(
      np.linalg.norm(bank_NxD, axis=1, keepdims=True), 1e-12)
  ranks = np.empty(len(pred), np.int64)
  for start in range(0, len(pred), chunk_size):
    sims = pred[start:start + chunk_size] @ bank.T
    rows = np.arange(len(sims))
    true = sims[rows, start + rows]
    ranks[start:start + len(sims)] = 1 + (sims > true[:, None]).sum(axis=1)
  return ranks


def _word_group_columns(run: saved_run.Run) -> dict[str, list[int]] | None:
  """Vocabulary columns of the synthetic corpus's word groups."""
  if run.vocabulary is None or run.config.data.name != 'synthetic':
    return None
  index = run.vocabulary.index
  return {group: [index[w] for w in words if w in index]
          for group, words in synthetic_grammar.word_groups().items()}


def analyze_split(run: saved_run.Run, name: str, *,
                  batch_size: int = 0) -> SplitAnalysis:
  """Predicts split `name` with the run's parameters and scores it like
  `train.train_and_evaluate` does (plus per-example scores)."""
  wanted = list(dict.fromkeys(('train', 'validation', name)))
  splits = datasets.load_splits(run.config, wanted)
  multiple = saved_run.data_batch_multiple(run)
  batch_size = batch_size or int(run.config.eval.batch_size)
  batch_size = -(-batch_size // multiple) * multiple
  split = splits[name]
  outputs = evaluate.predict_split(run.predict_step, run.params, split,
                                   mesh=run.mesh, global_batch_size=batch_size)
  predicted = outputs['embedding']
  targets = split.table.embeddings
  metrics = {'cosine': evaluate.mean_cosine(predicted, targets),
             'num_examples': len(split)}
  metrics.update(evaluate.reference_scores(
      splits, [name], run.config.eval.oracle_alphas)[name])
  metrics['gap_closed'] = evaluate.gap_closed(metrics)
  recall = vocab_metrics.retrieval_recall_at_k(
      predicted, targets, np.arange(len(targets)), ks=(1, 5, 10))
  metrics.update({f'recall@{k}': v for k, v in recall.items()})
  word_scores = labels = None
  if run.vocabulary is not None and 'word_logits' in outputs:
    logits = outputs['word_logits']
    labels = run.vocabulary.multi_hot(split.table.prompts.tolist())
    train_labels = run.vocabulary.multi_hot(
        splits['train'].table.prompts.tolist())
    metrics.update(evaluate.vocabulary_scores(logits, labels, train_labels))
    groups = _word_group_columns(run)
    if groups:
      metrics['word_groups'] = vocab_metrics.group_recall(
          logits, labels, groups, prior_V=train_labels.mean(axis=0))
    word_scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(
        np.float32)
  return SplitAnalysis(
      name=name, split=split, predicted_NxD=predicted,
      cosine_N=_per_example_cosine(predicted, targets),
      retrieval_rank_N=retrieval_ranks(predicted, targets), metrics=metrics,
      word_scores_NxV=word_scores, labels_NxV=labels)


def _per_example_cosine(pred_NxD, target_NxD) -> np.ndarray:
  pred = pred_NxD.astype(np.float64)
  target = target_NxD.astype(np.float64)
  norms = np.linalg.norm(pred, axis=1) * np.linalg.norm(target, axis=1)
  return (np.sum(pred * target, axis=1) / np.maximum(norms, 1e-12)).astype(
      np.float32)


def per_word_scores(word_scores_NxV: np.ndarray, labels_NxV: np.ndarray,
                    words: Sequence[str], k: int) -> list[dict]:
  """Per vocabulary word: support, precision and recall of predicting it
  when it is among an example's top-k words, and the average precision of
  ranking the examples by its score. Sorted by support, most frequent first.
  """
  num_words = word_scores_NxV.shape[1]
  k = min(k, num_words)
  top = np.argsort(-word_scores_NxV, axis=1, kind='stable')[:, :k]
  predicted = np.zeros(word_scores_NxV.shape, bool)
  np.put_along_axis(predicted, top, True, axis=1)
  labels = labels_NxV.astype(bool)
  support = labels.sum(axis=0)
  num_predicted = predicted.sum(axis=0)
  hits = (predicted & labels).sum(axis=0)
  rows = []
  for v in range(num_words):
    rows.append({
        'word': words[v], 'support': int(support[v]),
        'predicted': int(num_predicted[v]), 'hits': int(hits[v]),
        'precision': (float(hits[v] / num_predicted[v]) if num_predicted[v]
                      else None),
        'recall': float(hits[v] / support[v]) if support[v] else None,
        'average_precision': _average_precision(word_scores_NxV[:, v],
                                                labels[:, v]),
    })
  rows.sort(key=lambda r: (-r['support'], r['word']))
  return rows


def _average_precision(scores_N: np.ndarray, labels_N: np.ndarray
                       ) -> float | None:
  if not labels_N.any():
    return None
  ranked = labels_N[np.argsort(-scores_N, kind='stable')]
  precision_at = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
  return float(precision_at[ranked].mean())


def save_predictions(path: pathlib.Path, analysis: SplitAnalysis, step: int,
                     vocabulary_words: Sequence[str] | None) -> None:
  """Writes the split's predictions as .npz, atomically."""
  table = analysis.split.table
  arrays = dict(ids=table.ids, prompts=table.prompts,
                predicted_embedding=analysis.predicted_NxD.astype(np.float32),
                true_embedding=table.embeddings.astype(np.float32),
                cosine=analysis.cosine_N,
                retrieval_rank=analysis.retrieval_rank_N,
                step=np.int64(step), split=np.asarray(analysis.name))
  if analysis.word_scores_NxV is not None:
    arrays['word_scores'] = analysis.word_scores_NxV
    arrays['vocabulary'] = np.asarray(list(vocabulary_words), dtype=str)
  prediction_cache.atomic_write(path, lambda f: np.savez(f, **arrays))


# ----------------------------------------------------------------------------
# Training curves from the TensorBoard event files.


def read_scalar_curves(workdir: str | os.PathLike[str]
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """tag -> (steps, values) of every scalar the run logged.

  clu's writers log scalars as tensor summaries; both kinds are read. A
  resumed run repeats steps: the value written last wins.
  """
  # Imported here: tensorboard is heavy and only the report's curves need it.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  if not any(pathlib.Path(workdir).glob('events.out.tfevents.*')):
    return {}
  accumulator = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0,
                                   event_accumulator.SCALARS: 0})
  accumulator.Reload()
  tags = accumulator.Tags()
  points: dict[str, dict[int, float]] = {}
  for tag in tags.get('tensors', []):
    for event in accumulator.Tensors(tag):
      value = tensor_util.make_ndarray(event.tensor_proto)
      if value.size == 1 and np.issubdtype(value.dtype, np.number):
        points.setdefault(tag, {})[int(event.step)] = float(value.reshape(()))
  for tag in tags.get('scalars', []):
    for event in accumulator.Scalars(tag):
      points.setdefault(tag, {})[int(event.step)] = float(event.value)
  out = {}
  for tag, by_step in sorted(points.items()):
    steps = np.asarray(sorted(by_step), np.int64)
    out[tag] = (steps, np.asarray([by_step[s] for s in steps], np.float64))
  return out


def plot_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]]
                ) -> bytes | None:
  """One PNG with a small plot per training curve; None when there are none.
  """
  tags = [t for t in curves if not t.startswith(_SKIPPED_CURVE_PREFIXES)]
  if not tags:
    return None
  # Imported here: matplotlib is heavy and only the report's plots need it.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  columns = min(3, len(tags))
  rows = -(-len(tags) // columns)
  figure = Figure(figsize=(4.2 * columns, 2.6 * rows), dpi=80,
                  layout='constrained')
  for i, tag in enumerate(tags):
    axes = figure.add_subplot(rows, columns, i + 1)
    steps, values = curves[tag]
    axes.plot(steps, values, marker='o' if len(steps) < 30 else None,
              markersize=3, linewidth=1.2)
    axes.set_title(tag, fontsize=9)
    axes.set_xlabel('step', fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png')
  return buffer.getvalue()


def plot_histogram(values: np.ndarray, title: str) -> bytes:
  # Imported here: matplotlib is heavy and only the report's plots need it.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(5, 2.6), dpi=80, layout='constrained')
  axes = figure.add_subplot(1, 1, 1)
  axes.hist(values, bins=30, color='#4a7bb7')
  axes.set_title(title, fontsize=9)
  axes.tick_params(labelsize=7)
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png')
  return buffer.getvalue()


# ----------------------------------------------------------------------------
# The HTML report.

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1240px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; }
.meta { color: #555; font-size: 13px; }
.examples { display: grid; grid-template-columns: repeat(2, 1fr); gap: 12px; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 8px;
        display: flex; gap: 10px; font-size: 13px; }
.card img { width: 128px; height: 128px; image-rendering: pixelated;
            flex: none; border: 1px solid #ddd; }
.hit { color: #0a7d24; font-weight: bold; } .miss { color: #666; }
.true { font-weight: bold; } ul { margin: 2px 0; padding-left: 18px; }
"""


def _png_tag(png: bytes, alt: str, css: str = '') -> str:
  data = base64.b64encode(png).decode('ascii')
  style = f' style="{css}"' if css else ''
  return (f'<img alt="{html.escape(alt)}"{style} '
          f'src="data:image/png;base64,{data}">')


def _fmt(value) -> str:
  if value is None:
    return '–'
  if isinstance(value, float):
    return 'nan' if np.isnan(value) else f'{value:.4f}'
  return html.escape(str(value))


def _metrics_table(metrics: dict, reference: dict | None) -> str:
  rows = []
  for key, value in metrics.items():
    if isinstance(value, dict):
      continue
    ref = ('' if reference is None else
           f'<td class="num">{_fmt(reference.get(key))}</td>')
    rows.append(f'<tr><td>{html.escape(key)}</td>'
                f'<td class="num">{_fmt(value)}</td>{ref}</tr>')
  head = ('<tr><th>metric</th><th>this analysis</th>'
          + ('' if reference is None else '<th>results.json</th>') + '</tr>')
  return f'<table>{head}{"".join(rows)}</table>'


def _word_groups_table(groups: dict) -> str:
  rows = ''.join(
      f'<tr><td>{html.escape(g)}</td><td class="num">{_fmt(s["recall"])}</td>'
      f'<td class="num">{_fmt(s["chance"])}</td>'
      f'<td class="num">{_fmt(s.get("prior_recall"))}</td>'
      f'<td class="num">{s["num_examples"]}</td></tr>'
      for g, s in groups.items())
  return ('<table><tr><th>word group</th><th>recall</th><th>chance</th>'
          '<th>word-frequency prior</th>'
          f'<th>examples</th></tr>{rows}</table>')


def _example_card(analysis: SplitAnalysis, index: int, run: saved_run.Run,
                  bank: prompt_bank_lib.PromptBank, top_k: int) -> str:
  table = analysis.split.table
  image = analysis.split.load_images(np.array([index]))[0]
  prompt = str(table.prompts[index])
  parts = [f'<div><b>{html.escape(str(table.ids[index]))}</b> &nbsp; cosine '
           f'{analysis.cosine_N[index]:.3f} &nbsp; retrieval rank '
           f'{analysis.retrieval_rank_N[index]} of {len(table)}</div>',
           f'<div><span class="true">true prompt:</span> '
           f'{html.escape(prompt)}</div>']
  if analysis.word_scores_NxV is not None:
    scores = analysis.word_scores_NxV[index]
    true_words = set(np.flatnonzero(analysis.labels_NxV[index]))
    order = np.argsort(-scores, kind='stable')[:top_k]
    words = ', '.join(
        f'<span class="{"hit" if v in true_words else "miss"}">'
        f'{html.escape(run.vocabulary.words[v])} ({scores[v]:.2f})</span>'
        for v in order)
    parts.append(f'<div>predicted words: {words}</div>')
  rows, cosines = bank.nearest(analysis.predicted_NxD[index:index + 1], 3)
  items = ''.join(
      f'<li class="{"hit" if bank.prompts[r] == prompt else ""}">'
      f'{cosine:.3f} {html.escape(str(bank.prompts[r]))}</li>'
      for r, cosine in zip(rows[0], cosines[0]))
  parts.append(f'<div>nearest prompts of the split:<ul>{items}</ul></div>')
  thumbnail = _png_tag(preprocess.encode_image(image), prompt)
  return (f'<div class="card">{thumbnail}<div>{"".join(parts)}</div>'
          '</div>')


def _word_table(rows: list[dict], max_rows: int, k: int) -> str:
  shown = [r for r in rows if r['support'] > 0][:max_rows]
  body = ''.join(
      f'<tr><td>{html.escape(r["word"])}</td>'
      f'<td class="num">{r["support"]}</td>'
      f'<td class="num">{r["predicted"]}</td>'
      f'<td class="num">{_fmt(r["precision"])}</td>'
      f'<td class="num">{_fmt(r["recall"])}</td>'
      f'<td class="num">{_fmt(r["average_precision"])}</td></tr>'
      for r in shown)
  return (f'<p class="meta">Words of the split\'s prompts, most frequent first '
          f'({len(shown)} shown of {len(rows)} vocabulary words). Predicted: '
          f'among the example\'s top {k} words.</p>'
          '<table><tr><th>word</th><th>support</th><th>predicted</th>'
          '<th>precision</th><th>recall</th><th>average precision</th></tr>'
          f'{body}</table>')


def render_report(run: saved_run.Run, analysis: SplitAnalysis, *,
                  curves_png: bytes | None, results_reference: dict | None,
                  num_examples: int, top_k: int, max_words: int = 200) -> str:
  """The self-contained HTML page of the analysis."""
  config = run.config
  bank = prompt_bank_lib.PromptBank.from_table(
      analysis.split.table.prompts, analysis.split.table.embeddings,
      source=f'split {analysis.name}')
  order = np.argsort(-analysis.cosine_N, kind='stable')
  count = min(num_examples, len(order))
  best = ''.join(_example_card(analysis, i, run, bank, top_k)
                 for i in order[:count])
  worst = ''.join(_example_card(analysis, i, run, bank, top_k)
                  for i in order[::-1][:count])
  sections = [
      f'<h1>reverse_sd: {html.escape(analysis.name)} split, step '
      f'{run.step}</h1>',
      f'<p class="meta">Run {html.escape(str(run.workdir))}; backbone '
      f'{html.escape(config.model.backbone)}/'
      f'{html.escape(config.model.variant)}'
      f', data {html.escape(config.data.name)}, input {run.input_shape[0]}px, '
      f'vocabulary head: {len(run.vocabulary) if run.vocabulary else "off"}'
      f'; checkpoints {list(run.steps)}; made '
      f'{datetime.datetime.now().isoformat(timespec="seconds")}.</p>',
      '<h2>Metrics</h2>',
      _metrics_table(analysis.metrics, results_reference),
  ]
  if 'word_groups' in analysis.metrics:
    sections += ['<h3>Word groups</h3>',
                 _word_groups_table(analysis.metrics['word_groups'])]
  sections.append('<h2>Training curves</h2>')
  sections.append(_png_tag(curves_png, 'training curves') if curves_png else
                  '<p>No training curves: no TensorBoard event files with '
                  'scalars in the workdir.</p>')
  sections += [
      '<h2>Cosine to the true prompt embedding</h2>',
      _png_tag(plot_histogram(analysis.cosine_N,
                              f'per-example cosine, {analysis.name}'),
               'cosine histogram'),
      f'<h2>Best {count} examples</h2><div class="examples">{best}</div>',
      f'<h2>Worst {count} examples</h2><div class="examples">{worst}</div>',
  ]
  if analysis.word_scores_NxV is not None:
    rows = per_word_scores(analysis.word_scores_NxV, analysis.labels_NxV,
                           run.vocabulary.words, top_k)
    sections += ['<h2>Per-word precision and recall</h2>',
                 _word_table(rows, max_words, top_k)]
  body = '\n'.join(sections)
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<title>reverse_sd {html.escape(analysis.name)} step {run.step}'
          f'</title><style>{_CSS}</style></head><body>\n{body}\n'
          '</body></html>\n')


# ----------------------------------------------------------------------------
# The command.


def _results_reference(run: saved_run.Run, split: str) -> dict | None:
  """The split's scores in results.json, if it was written at this step."""
  path = run.workdir / 'results.json'
  if not path.is_file():
    return None
  try:
    results = json.loads(path.read_text())
    if results['meta']['step'] != run.step:
      return None
    return results['splits'].get(split)
  except (ValueError, KeyError, TypeError):
    return None


def analyze(workdir: str | os.PathLike[str], *, step: int | None = None,
            split: str = 'test', output_dir: str | os.PathLike[str] = '',
            num_examples: int = 8, top_k: int = 5, batch_size: int = 0,
            max_words: int = 200) -> dict:
  """Writes the predictions file and the report; returns a summary dict."""
  run = saved_run.restore_run(workdir, step)
  output_dir = pathlib.Path(output_dir or run.workdir / 'analysis')
  analysis = analyze_split(run, split, batch_size=batch_size)
  stem = f'{split}_step{run.step}'
  predictions_path = output_dir / f'predictions_{stem}.npz'
  report_path = output_dir / f'report_{stem}.html'
  if jax.process_index() == 0:
    save_predictions(predictions_path, analysis, run.step,
                     run.vocabulary.words if run.vocabulary else None)
    curves_png = plot_curves(read_scalar_curves(run.workdir))
    page = render_report(run, analysis, curves_png=curves_png,
                         results_reference=_results_reference(run, split),
                         num_examples=num_examples, top_k=top_k,
                         max_words=max_words)
    prediction_cache.atomic_write(report_path, lambda f: f.write(page.encode('utf-8')))
    logging.info('Wrote %s and %s.', predictions_path, report_path)
  return {'workdir': str(run.workdir), 'step': run.step, 'split': split,
          'predictions': str(predictions_path), 'report': str(report_path),
          'metrics': analysis.metrics}


def _main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f'analyze: unexpected arguments {argv[1:]}')
  tuning.tune_process()
  try:
    summary = analyze(
        _FLAGS.workdir, step=None if _FLAGS.step < 0 else _FLAGS.step,
        split=_FLAGS.split, output_dir=_FLAGS.output_dir,
        num_examples=_FLAGS.num_examples, top_k=_FLAGS.top_k,
        batch_size=_FLAGS.batch_size, max_words=_FLAGS.max_words)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'analyze: error: {e}') from e
  print(json.dumps(summary, indent=2, default=float))
  sys.stdout.flush()


if __name__ == '__main__':
  from reverse_sd import cli as _cli  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string('workdir', None, 'A trained run.', required=True)
  _flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the latest).')
  _flags.DEFINE_string('split', 'test', 'The split to analyse.')
  _flags.DEFINE_string('output_dir', '', 'Default: WORKDIR/analysis.')
  _flags.DEFINE_integer('num_examples', 8, 'Best and worst examples shown.',
                        lower_bound=0)
  _flags.DEFINE_integer('top_k', 5, 'Predicted words per example.',
                        lower_bound=1)
  _flags.DEFINE_integer('batch_size', 0, '0: the run\'s eval batch size.',
                        lower_bound=0)
  _flags.DEFINE_integer('max_words', 200, 'Rows of the per-word table.',
                        lower_bound=0)
  _FLAGS = _flags.FLAGS
  _cli.run(_main)
