"""`<workdir>/results/miniature_loop.md`: the loop's tables and pictures.

Written from the stage records (`<workdir>/stages/*.json`) after every run
of the loop, so it always shows what has finished; a stage that has not run
yet is named as missing.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from reverse_sd.loop import referee as referee_lib

RESULTS_DIR = 'results'
REPORT_FILE = 'miniature_loop.md'
QUALITY_PICTURE = 'quality_samples.png'


def sample_grid(rows: list[np.ndarray], scale: int = 2,
                gap: int = 2) -> np.ndarray:
  """Rows of uint8 images [N, H, W, 3] -> one uint8 picture, white gaps."""
  n = max(len(r) for r in rows)
  height, width = rows[0].shape[1:3]
  out = np.full((len(rows) * (height + gap) - gap,
                 n * (width + gap) - gap, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      out[i * (height + gap):i * (height + gap) + height,
          j * (width + gap):j * (width + gap) + width] = image
  if scale != 1:
    out = np.asarray(Image.fromarray(out).resize(
        (out.shape[1] * scale, out.shape[0] * scale), Image.NEAREST))
  return out


def save_picture(path: pathlib.Path, rows: list[np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp.png')
  Image.fromarray(sample_grid(rows)).save(tmp)
  tmp.replace(path)


def _fmt(value: float | None) -> str:
  return '-' if value is None else f'{value:.3f}'


def quality_table(record: dict[str, Any], referee_record: dict[str, Any]
                  ) -> list[str]:
  """The referee's accuracy per attribute: generated, the autoencoder's
  round trip of the rendered images, rendered, chance."""
  uniform = referee_record.get('uniform_chance', {})
  reconstructed = record.get('reconstructed_accuracy', {})
  lines = ['| attribute | generated | autoencoded | rendered | majority | '
           'uniform |', '|---|---|---|---|---|---|']
  for group in referee_lib.GROUPS:
    if group not in record['generated_accuracy']:
      continue
    lines.append(
        f"| {group} | {_fmt(record['generated_accuracy'][group])} | "
        f"{_fmt(reconstructed.get(group))} | "
        f"{_fmt(record['rendered_accuracy'].get(group))} | "
        f"{_fmt(record['chance'].get(group))} | {_fmt(uniform.get(group))} |")
  return lines


ROW_NAMES = {
    'blackbox': 'black-box ConvNet (joint loss)',
    'vit': 'ViT (joint loss)',
    'whitebox_empty': "white-box: the generator's U-Net encoder, empty prompt",
    'whitebox_caption': ('white-box, caption of the black-box top words'),
    'plain': 'black-box, embedding loss only',
    'curriculum_model': '+ curriculum, model-based difficulty',
    'curriculum_referee': "+ curriculum, the referee's alignment (oracle)",
}
GROUP_COLUMNS = ('shape', 'colour', 'size', 'position', 'texture', 'style')


def _pm(stats: dict[str, Any] | None, scale: float = 1.0) -> str:
  if not stats:
    return '-'
  if stats.get('std') is None:  # One seed.
    return f"{scale * stats['mean']:.3f}"
  return f"{scale * stats['mean']:.3f} ± {scale * stats['std']:.3f}"


def reverse_table(rows: dict[str, Any], split: str = 'test') -> list[str]:
  """Rows of reverse models: mean ± std over seeds on `split`."""
  header = (['model', 'cosine', 'recall@1', 'recall@10', 'vocab F1@10'] +
            [f'recall {g}' for g in GROUP_COLUMNS])
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for row, by_split in rows.items():
    stats = by_split[split]
    cells = [ROW_NAMES.get(row, row), _pm(stats.get('cosine')),
             _pm(stats.get('recall@1')), _pm(stats.get('recall@10')),
             _pm(stats.get('vocab_f1@10'))]
    cells += [_pm(stats.get(f'recall/{g}')) for g in GROUP_COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def dakl_table(dakl: dict[str, Any]) -> list[str]:
  lines = ['| predictions | test cosine | test_shifted cosine |',
           '|---|---|---|']
  for key, by_split in dakl['rows'].items():
    lines.append(f"| {key} | {_pm(by_split['test']['cosine'])} | "
                 f"{_pm(by_split['test_shifted']['cosine'])} |")
  return lines


def reuse_table(record: dict[str, Any]) -> list[str]:
  generators = ('original', 'reused', 'reused+ft')
  groups = list(record['original']['accuracy'])
  header = ['generator', 'judge cosine', 'diversity'] + groups
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for name in generators:
    if name not in record:
      continue
    r = record[name]
    lines.append('| ' + ' | '.join(
        [name, _pm(r['judge_cosine']), f"{r['diversity']:.3f}"] +
        [_pm(r['accuracy'][g]) for g in groups]) + ' |')
  return lines


def write(workdir: str | pathlib.Path, records: dict[str, dict[str, Any]],
          command: str) -> pathlib.Path:
  """Writes the report from the finished stages' records; returns its path."""
  workdir = pathlib.Path(workdir)
  out = workdir / RESULTS_DIR / REPORT_FILE
  lines = ['# The reverse-SD loop in miniature', '',
           f'Command: `{command}`', '']
  lines += ['## Stages', '', '| stage | wall time (s) |', '|---|---|']
  lines += [f"| {name} | {r['time_s']:.0f} |" for name, r in records.items()]
  lines.append(f"| total | {sum(r['time_s'] for r in records.values()):.0f} |")
  lines.append('')
  if 'autoencoder' in records:
    ae = records['autoencoder']
    lines += ['## Autoencoder', '',
              f"Latent scaling factor {ae['scaling_factor']:.3f}; mean "
              f"absolute reconstruction error {ae['test_l1_0_255']:.1f} "
              '(of 255) on rendered test images.', '']
  if 'quality' in records and 'referee' in records:
    q = records['quality']
    lines += ['## Generator quality (stage 3)', '',
              f"The referee's per-attribute accuracy on {q['num_prompts']} "
              'held-out prompts: their generated images, the autoencoder\'s '
              'round trip of their rendered images (the most a generator in '
              'its latent space can score), the rendered images, and two '
              'chance levels (the majority value; one over the number of '
              'values). Gate: colour >= 0.70 and shape >= 0.50. Sampling: '
              f"{q['images_per_s']:.1f} images/s.", '']
    lines += quality_table(q, records['referee']) + ['']
    if (workdir / RESULTS_DIR / QUALITY_PICTURE).exists():
      lines += [f'![rendered (top) and generated (below) images of the same '
                f'prompts]({QUALITY_PICTURE})', '']
  if 'generated' in records:
    g = records['generated']
    lines += ['## Generated data set (stage 4)', '',
              f"`{g['name']}`: " + ', '.join(
                  f'{split} {n}' for split, n in g['splits'].items()) + '.',
              '']
  if 'whitebox' in records:
    w = records['whitebox']
    lines += ['## White-box against black-box on generated images (stage 5)',
              '', f"Test split of the generated data set; mean ± std over "
              f"seeds {w['seeds']}.", '']
    lines += reverse_table(w['rows']) + ['']
  if 'ingredients' in records:
    g = records['ingredients']
    rho = g['spearman_model_difficulty_vs_referee_alignment']
    lines += ['## The method\'s ingredients on generated images (stage 6)',
              '', f"Test split; mean ± std over seeds {g['seeds']}.", '']
    lines += reverse_table(g['rows']) + ['']
    lines += [f"Spearman correlation of the model-based difficulty with the "
              f"referee's alignment: {_pm(rho)} (per seed: " +
              ', '.join(f'{v:.3f}' for v in rho['per_seed']) + ').', '']
    lines += ['DA-KL (`reverse_sd.domain_adaptation` rows; single = the '
              'joint-loss black-box, ensemble = it and the plain one; '
              f"{g['dakl']['settings']['num_centroids']} centroids):", '']
    lines += dakl_table(g['dakl']) + ['']
  if 'reuse' in records:
    r = records['reuse']
    lines += ['## The reverse-trained encoder back in the generator (stage 7)',
              '', f"{r['num_prompts']} held-out prompts x seeds {r['seeds']}."
              ' Accuracy: the referee against the prompt; judge cosine: the '
              "prompt's embedding against an independent black-box model's "
              'prediction (trained on rendered images); diversity: mean '
              "pairwise distance in the referee's feature space between "
              "seeds of one prompt. L2 distance of the swapped encoder's "
              f"parameters from the original's: {r['encoder_change']:.3f}.",
              '']
    lines += reuse_table(r) + ['']
    lines += [f"![rows: {', '.join(r['picture_rows'])}](reuse_samples.png)",
              '']
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix('.md.tmp')
  tmp.write_text('\n'.join(lines))
  tmp.replace(out)
  return out


def load_records(workdir: str | pathlib.Path, order: Sequence[str] = ()
                 ) -> dict[str, dict[str, Any]]:
  """The stage records in `workdir`, in `order` (the loop's stage order),
  then any others by name."""
  paths = sorted((pathlib.Path(workdir) / 'stages').glob('*.json'),
                 key=lambda p: (list(order).index(p.stem) if p.stem in order
                                else len(order), p.stem))
  return {p.stem: json.loads(p.read_text()) for p in paths}
