"""The tiny trained run that the restore, predict and Python-API tests share:
4 steps, checkpoints at 2 and 4, the vocabulary head on, the test split."""

import ml_collections

from configs import synthetic


def config(data_dir) -> ml_collections.ConfigDict:
  """configs/synthetic.py:tiny reading (or building) its data in
  `data_dir`."""
  config = synthetic.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = str(data_dir)
    config.train.num_steps = 4
    config.train.checkpoint_every_steps = 2
    config.train.eval_every_steps = 100
    config.vocab.loss_weight = 0.1
    config.eval.splits = ('test',)
    config.eval.periodic_splits = ()
  return config
