r"""The paper's ablation on the synthetic corpus: vocabulary head, curriculum.

  .venv/bin/python -m reverse_sd.sweep \
      --sweep=configs/sweeps/ablation_synthetic.py \
      --workdir=runs/ablation_synthetic --report=results/ablation_synthetic.md

Four settings x 3 seeds, in this order: baseline, +vocabulary head (BCE
weight 0.1), +curriculum, +both. The curriculum runs of seed s take their
difficulty from the baseline run of seed s (its three kept checkpoints,
linearly weighted), so the baselines run first. Each run is the default
model on the 3-epoch `ablation` schedule (`configs/synthetic.py:ablation`);
a seed sets both the initialisation and the data order.
"""

CONFIG = 'configs/synthetic.py:ablation'
SEEDS = (0, 1, 2)

_SETTINGS = {
    'baseline': {},
    'vocab': {'vocab.loss_weight': 0.1},
    'curriculum': {'curriculum.difficulty': 'model'},
    'vocab_curriculum': {'vocab.loss_weight': 0.1,
                         'curriculum.difficulty': 'model'},
}


def get_sweep() -> list[dict]:
  runs = []
  for group, overrides in _SETTINGS.items():
    for seed in SEEDS:
      run = {'name': f'{group}_seed{seed}', 'group': group, 'seed': seed,
             'data.shuffle_seed': seed, **overrides}
      if 'curriculum.difficulty' in overrides:
        run['curriculum.scorer_workdir'] = f'{{sweep_dir}}/baseline_seed{seed}'
      runs.append(run)
  return runs


REPORT = {
    'title': 'Ablation on the synthetic corpus: vocabulary head and curriculum',
    'metrics': [
        ('test cosine', 'splits.test.cosine', '.4f'),
        ('gap closed', 'splits.test.gap_closed', '.3f'),
        ('test_shifted cosine', 'splits.test_shifted.cosine', '.4f'),
        ('vocab F1@10', 'splits.test.vocab_f1@10', '.3f'),
        ('frequent-words F1@10', 'splits.test.vocab_f1@10_frequent_words',
         '.3f'),
        ('vocab mAP', 'splits.test.vocab_map', '.3f'),
        ('recall@1', 'splits.test.recall@1', '.3f'),
        ('recall@5', 'splits.test.recall@5', '.3f'),
    ],
    'notes': (
        'Each run: `configs/synthetic.py:ablation` (the default ConvNet, '
        '20,000 training images at 64 px, batch 64, 3 epochs = 938 steps, '
        'half the main job\'s 6 epochs), seeds 0, 1, 2 (initialisation and '
        'data order). Vocabulary head: Dense(384 -> V) on the predicted '
        'embedding, BCE weight 0.1, V = all content words of the training '
        'prompts (99 < 1000). Curriculum: difficulty = the same-seed '
        'baseline\'s per-example cosine, linearly weighted over its kept '
        'checkpoints (steps 500, 750, 938); stages draw from the easiest '
        '1/3, 1/2, then all examples, for 1/4, 1/4 and 1/2 of the steps. '
        'Metrics on the 2,000-example test split (test_shifted: the shifted '
        'domain); gap closed = (cosine - mean-embedding baseline) / '
        '(attribute oracle - baseline).'),
}
