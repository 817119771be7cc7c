r"""The whole loop in miniature: `python -m reverse_sd.loop --workdir=DIR`.

  python -m reverse_sd.loop --workdir=/tmp/loop \
      [--config=configs/loop.py[:tiny]] [--config.generator.steps=4000] \
      [--stages=corpus,autoencoder,...]

Runs the stages of `reverse_sd.loop.stages` in order. Rerunning the same
command skips the finished stages and resumes a killed one from its
checkpoints or shards. Each stage's record (results and wall time) is in
`DIR/stages/<stage>.json`.
"""

import logging as std_logging
import pathlib
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from reverse_sd import cli
from reverse_sd.loop import stages
from reverse_sd.ops.cpu import tuning

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[2] /
                      'configs' / 'loop.py')


def _define_flags() -> None:
  """Defined when run, not on import: other entry points own --config."""
  config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Loop config, e.g. configs/loop.py[:tiny].',
      lock_config=True)
  flags.DEFINE_string('workdir', None, "The loop's folder.", required=True)
  flags.DEFINE_list(
      'stages', [], 'Run only these stages (default: all, in order): '
      + ','.join(name for name, _ in stages.STAGES))


class _ProjectInfoFilter(std_logging.Filter):
  """INFO from this project only; warnings from everyone."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or
            '/reverse_sd/' in record.pathname.replace('\\', '/'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  handler.addFilter(_ProjectInfoFilter())
  handler.setFormatter(std_logging.Formatter('%(asctime)s %(message)s',
                                             '%H:%M:%S'))
  tuning.tune_process()
  records = stages.run(flags.FLAGS.config, flags.FLAGS.workdir,
                       tuple(flags.FLAGS.stages),
                       command=shlex.join(['python', '-m', 'reverse_sd.loop',
                                           *sys.argv[1:]]))
  total = sum(r['time_s'] for r in records.values())
  for name, record in records.items():
    print(f'{name:12s} {record["time_s"]:8.1f} s')
  print(f'{"total":12s} {total:8.1f} s')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
