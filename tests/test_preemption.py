"""Preemption: SIGTERM saves a checkpoint at the current step, exits 75, and
the rerun of the same command resumes there."""

import os
import signal

import orbax.checkpoint as ocp
import pytest

import main_processes
from reverse_sd import checkpointing
from reverse_sd import distributed
from reverse_sd import main as main_lib

TIMEOUT_S = 900
# Long enough that SIGTERM, sent once step 3 is logged, lands mid-run; never
# a checkpoint step on the regular cadence.
OVERRIDES = {'num_steps': 300, 'checkpoint_every_steps': 1000,
             'eval_every_steps': 1000, 'log_every_steps': 1}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return main_processes.shared_data_dir(tmp_path_factory)


def test_notice_flags_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  notice = distributed.PreemptionNotice()
  notice.start()
  try:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.reached(2)
  finally:
    notice.stop()
  assert signal.getsignal(signal.SIGTERM) == before


def _preempted_step(processes, workdir) -> int:
  """Checks a clean preemption of all processes; returns the saved step."""
  codes = main_processes.wait_all(processes, TIMEOUT_S)
  report = main_processes.describe(processes)
  assert codes == [main_lib.PREEMPTED_EXIT_CODE] * len(processes), (
      f'expected exit {main_lib.PREEMPTED_EXIT_CODE} (preempted) from '
      f'every process:\n{report}')
  steps = checkpointing.create_manager(workdir, read_only=True).all_steps()
  assert len(steps) == 1, (steps, report)
  step = steps[0]
  assert 3 <= step < OVERRIDES['num_steps'], (step, report)
  for process in processes:
    assert (f'Preempted at step {step} of {OVERRIDES["num_steps"]}: saved '
            f'checkpoint {workdir}/checkpoints/{step}. Rerun the same '
            f'command to resume from step {step}.') in process.stderr, (
                process.tail())
  assert not (workdir / 'results.json').exists()
  return step


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  args = main_processes.main_args(workdir, data_dir, **OVERRIDES)
  processes = main_processes.start_processes(
      args, tmp_path / 'first', num_processes=1, devices_per_process=8)
  main_processes.wait_for_step(processes, 3, TIMEOUT_S)
  processes[0].popen.send_signal(signal.SIGTERM)
  step = _preempted_step(processes, workdir)
  _check_data_position(workdir, step)

  rerun = main_processes.start_processes(
      args, tmp_path / 'rerun', num_processes=1, devices_per_process=8)
  assert main_processes.wait_all(rerun, TIMEOUT_S) == [0], (
      main_processes.describe(rerun))
  assert f'Training from step {step} to 300' in rerun[0].stderr, (
      rerun[0].tail())
  steps = checkpointing.create_manager(workdir, read_only=True).all_steps()
  assert steps == [step, 300]
  assert (workdir / 'results.json').exists()


@pytest.mark.parametrize('preemption_service', ['true', 'false'])
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    data_dir, tmp_path, preemption_service):
  """With JAX's preemption service (the default after
  jax.distributed.initialize) and without it (a flag all-gathered at every
  step), a notice to one process stops every process at the same step."""
  workdir = tmp_path / 'run'
  processes = main_processes.start_processes(
      main_processes.main_args(workdir, data_dir, **OVERRIDES),
      tmp_path / 'logs', num_processes=2, devices_per_process=4,
      JAX_ENABLE_PREEMPTION_SERVICE=preemption_service)
  main_processes.wait_for_step(processes, 3, TIMEOUT_S)
  processes[1].popen.send_signal(signal.SIGTERM)
  step = _preempted_step(processes, workdir)
  _check_data_position(workdir, step)


def _check_data_position(workdir, step):
  """The checkpoint carries the data position of its step."""
  manager = checkpointing.create_manager(workdir, read_only=True)
  position = manager.restore(step, args=ocp.args.Composite(
      data=ocp.args.JsonRestore()))['data']
  assert position['examples_seen'] == step * 16, position
