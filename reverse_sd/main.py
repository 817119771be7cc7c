r"""Entry point: trains and evaluates the model of a config in a workdir.

  python -m reverse_sd.main --config=configs/synthetic.py --workdir=/tmp/run \
      [--config.train.batch_size=32 ...]

Rerunning the same command in the same workdir resumes from the latest
checkpoint. The config is locked: an override of an unknown key fails before
anything runs.

Multi-process (see `reverse_sd.distributed`): every process runs the same
command with the same --workdir (on a file system all of them see). On TPU
pods (`launch/tpu_pod.sh`, which passes --multihost=on) and under SLURM
(`launch/gpu_slurm.sh`) JAX finds its peers; elsewhere pass them:

  python -m reverse_sd.main ... --coordinator_address=HOST:PORT \
      --num_processes=N --process_id=I

Preemption: on SIGTERM the run saves a checkpoint at the next step (the same
step on every process), logs 'Preempted at step N ...', writes no
results.json and exits with status 75 (PREEMPTED_EXIT_CODE, sysexits'
EX_TEMPFAIL: try again); rerunning the same command resumes from that step.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from reverse_sd import cli
from reverse_sd import distributed
from reverse_sd import train
from reverse_sd.ops.cpu import tuning

# Exit status after a preemption notice: a checkpoint was saved but the run
# is not finished (no results.json); rerun the same command to resume. Not
# 0, so a scheduler or script does not take the run for done.
PREEMPTED_EXIT_CODE = 75

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/synthetic.py[:arg].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, summaries, results.')
_MULTIHOST = flags.DEFINE_enum(
    'multihost', 'auto', distributed.MODES,
    'auto: jax.distributed.initialize() when the flags below are set or the '
    'environment names a multi-process cluster (SLURM, Open MPI, '
    'TPU_WORKER_HOSTNAMES); on: always (e.g. Cloud TPU VM pods, where JAX '
    'asks the TPU metadata server); off: single process.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None,
    'HOST:PORT of process 0, for a multi-process run started by hand; with '
    '--num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes (with --coordinator_address).',
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0 .. num_processes-1 (with '
    '--coordinator_address).', lower_bound=0)


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
  coordinator = distributed.Coordinator(
      address=_COORDINATOR_ADDRESS.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  try:
    distributed.initialize(_MULTIHOST.value, coordinator)
  except ValueError as e:  # Bad or missing multi-process flags.
    raise app.UsageError(str(e)) from e
  tuning.tune_process()
  logging.info('JAX %s: %s.', jax.__version__, distributed.describe())
  try:
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except distributed.Preempted as e:
    # No process leaves before every process has finished saving.
    distributed.barrier('reverse_sd:preempted')
    logging.warning('%s', e)
    sys.exit(PREEMPTED_EXIT_CODE)
  if jax.process_index() == 0:
    print(train.format_results_table(results))
    print(f'results: {_WORKDIR.value}/results.json')
    sys.stdout.flush()


if __name__ == '__main__':
  # Required only when run: importing this module (tests, tools) must not
  # add validators to the global flags other entry points parse.
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
