r"""Entry point: trains and evaluates the model of a config in a workdir.

  python -m reverse_sd.main --config=configs/synthetic.py --workdir=/tmp/run \
      [--config.train.batch_size=32 ...]

Rerunning the same command in the same workdir resumes from the latest
checkpoint. The config is locked: an override of an unknown key fails before
anything runs.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from reverse_sd import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/synthetic.py[:arg].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, summaries, results.')
flags.mark_flags_as_required(['config', 'workdir'])


class _ProjectInfoFilter(std_logging.Filter):
  """Keeps warnings from everyone, but INFO only from this project and clu.

  Orbax and TFDS log several INFO lines per checkpoint or file; the progress
  lines a user wants (data, embedding, steps/s, ETA, metrics) come from
  reverse_sd and clu.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    path = record.pathname.replace('\\', '/')
    return '/reverse_sd/' in path or '/clu/' in path


def _configure_logging() -> None:
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  handler.addFilter(_ProjectInfoFilter())
  handler.setFormatter(
      std_logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _configure_logging()
  logging.info('JAX %s: %d process(es), %d device(s) (%s).', jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(train.format_results_table(results))
    print(f'results: {_WORKDIR.value}/results.json')
    sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
