"""The main job: train and evaluate on the embedded synthetic corpus.

Usage:
  python -m reverse_sd.main --config=configs/synthetic.py --workdir=DIR
  python -m reverse_sd.main --config=configs/synthetic.py:tiny --workdir=DIR

`arg` picks a size: '' (default, the CPU main job), 'ablation' (the default
model and data on a 3-epoch schedule, for the 12-run ablation sweep in
`configs/sweeps/ablation_synthetic.py`) or 'tiny' (seconds; tests).
"""

import ml_collections

from configs import common


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The synthetic-corpus config for `arg` in ('', 'default', 'ablation',
  'tiny')."""
  config = common.get_base_config()
  size = arg or 'default'
  if size == 'default':
    pass
  elif size == 'ablation':
    config.train.num_epochs = 3.0
    # Four checkpoints (250, 500, 750, 938), the last three kept: the
    # baseline runs of the sweep score the curriculum runs' difficulty.
    config.train.checkpoint_every_steps = 250
  elif size == 'tiny':
    config.data.image_size = 32
    config.data.num_train = 256
    config.data.num_validation = 64
    config.data.num_test = 64
    config.data.num_test_shifted = 64
    config.model.variant = 'tiny'
    config.train.batch_size = 16
    config.train.num_epochs = 1.0
    config.train.log_every_steps = 4
    config.train.eval_every_steps = 8
    config.train.checkpoint_every_steps = 8
    config.eval.batch_size = 32
  else:
    raise ValueError(f'configs/synthetic.py: unknown size {arg!r}; '
                     "expected '', 'default', 'ablation' or 'tiny'.")
  config.lock()
  return config
