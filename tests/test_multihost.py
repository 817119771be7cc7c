"""Multi-process training: start-up logic, and two CPU processes on localhost.

The two-process run (4 fake devices each) must match one process with 8
fake devices step for step: the train stream is a function of global
offsets, each process reads its rows of every global batch, and the mesh
has the same 8 devices in both.
"""

import json

import jax
import numpy as np
import pytest

import main_processes
from reverse_sd import checkpointing
from reverse_sd import distributed
from reverse_sd import train
from reverse_sd.data import datasets
from reverse_sd.data import pipeline

TIMEOUT_S = 900  # Two processes on a busy 2-core machine compile slowly.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return main_processes.shared_data_dir(tmp_path_factory)


# Start-up logic (no processes started).


@pytest.mark.parametrize('environ,cluster', [
    ({}, None),
    ({'SLURM_NTASKS': '1', 'SLURM_STEP_NODELIST': 'n1'}, None),
    ({'SLURM_NTASKS': '8', 'SLURM_STEP_NODELIST': 'n[1-2]'}, 'slurm'),
    ({'SLURM_NTASKS': '8'}, None),  # The batch step, not an srun step.
    ({'OMPI_COMM_WORLD_SIZE': '4'}, 'open_mpi'),
    ({'TPU_WORKER_HOSTNAMES': 'w0'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'tpu'),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'JAX_COORDINATOR_ADDRESS'),
])
def test_detected_cluster(environ, cluster):
  assert distributed.detected_cluster(environ) == cluster


@pytest.fixture
def init_calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of making them."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  for name in ('SLURM_NTASKS', 'SLURM_STEP_NODELIST', 'OMPI_COMM_WORLD_SIZE',
               'TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_single_process_does_nothing(init_calls):
  distributed.initialize('auto')
  distributed.initialize('off')
  assert not init_calls


def test_initialize_explicit_flags(init_calls):
  distributed.initialize('auto', distributed.Coordinator('localhost:1234', 2,
                                                         1))
  assert init_calls == [{'coordinator_address': 'localhost:1234',
                         'num_processes': 2, 'process_id': 1}]
  assert jax.config.jax_cpu_collectives_implementation == 'gloo'


def test_initialize_auto_detects_slurm_and_on_always_inits(init_calls,
                                                           monkeypatch):
  distributed.initialize('on')  # E.g. a TPU pod worker: JAX asks metadata.
  monkeypatch.setenv('SLURM_NTASKS', '4')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'gpu[01-02]')
  distributed.initialize('auto')
  assert init_calls == [{}, {}]


@pytest.mark.parametrize('mode,coordinator,match', [
    ('auto', distributed.Coordinator(num_processes=2), '--coordinator_address'),
    ('auto', distributed.Coordinator('localhost', 2, 0), 'HOST:PORT'),
    ('auto', distributed.Coordinator('localhost:1', 2, 2), r'\[0, 2\)'),
    ('off', distributed.Coordinator('localhost:1', 2, 0), 'multihost=off'),
    ('sometimes', distributed.Coordinator(), 'sometimes'),
])
def test_initialize_rejects_bad_settings(init_calls, mode, coordinator, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(mode, coordinator)
  assert not init_calls


def test_incomplete_flags_fail_before_anything_runs(tmp_path):
  process = main_processes.MainProcess(
      ['--config=configs/synthetic.py:tiny', f'--workdir={tmp_path / "run"}',
       '--num_processes=2'], tmp_path / 'logs', 'cli',
      main_processes.subprocess_env(1))
  assert main_processes.wait_all([process], 300) == [1], process.tail()
  assert '--coordinator_address' in process.stderr, process.tail()
  assert not (tmp_path / 'run').exists()


# The stream: two processes' rows make the one-process batch.


def test_process_rows_make_the_global_batch(data_dir):
  split = datasets.load_splits(main_processes.tiny_config(data_dir),
                               ['train'])['train']

  def stream(index, count):
    return pipeline.TrainStream(split, global_batch_size=16, shuffle_seed=3,
                                process_index=index, process_count=count)

  whole = stream(0, 1)
  halves = [stream(0, 2), stream(1, 2)]
  for offset in (0, 16, 250):  # 250: across the end of the first epoch.
    expected = whole.batch_at(offset)
    parts = [half.batch_at(offset) for half in halves]
    for key in ('index', 'image', 'embedding'):
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), expected[key], err_msg=key)


# Two processes on localhost.


def _params_on_one_device(workdir, step):
  """The params of a checkpoint, whatever devices and processes wrote it."""
  restored_step, state = checkpointing.load_state_arrays(workdir, step)
  assert restored_step == step
  return state['params']


def test_two_processes_match_one_and_a_single_process_resumes(
    data_dir, tmp_path, monkeypatch):
  overrides = {'num_steps': 6, 'checkpoint_every_steps': 3,
               'eval_every_steps': 100}
  multi_dir = tmp_path / 'two_processes'
  processes = main_processes.start_processes(
      main_processes.main_args(multi_dir, data_dir, **overrides),
      tmp_path / 'logs', num_processes=2, devices_per_process=4)

  # Meanwhile, the same run in this process on 8 fake devices.
  config = main_processes.tiny_config(data_dir, **overrides)
  train.train_and_evaluate(config, tmp_path / 'one_process')

  codes = main_processes.wait_all(processes, TIMEOUT_S)
  report = main_processes.describe(processes)
  assert codes == [0, 0], report
  for process in processes:
    assert f'process {process.name[-1]} of 2; 4 local device(s)' in (
        process.stderr), report
    assert ' of 8 (cpu' in process.stderr, report
  # Only process 0 reports and writes results.json.
  assert 'results: ' in processes[0].stdout, report
  assert 'results: ' not in processes[1].stdout, report
  results = json.loads((multi_dir / 'results.json').read_text())
  assert results['meta']['num_processes'] == 2
  assert results['meta']['num_devices'] == 8
  assert results['meta']['step'] == 6
  assert sorted(p.name for p in multi_dir.iterdir()
                if 'results' in p.name) == ['results.json']
  manager = checkpointing.create_manager(multi_dir, read_only=True)
  assert manager.all_steps() == [3, 6]

  multi_leaves = jax.tree_util.tree_leaves_with_path(
      _params_on_one_device(multi_dir, 6))
  single_leaves = jax.tree.leaves(
      _params_on_one_device(tmp_path / 'one_process', 6))
  assert len(multi_leaves) == len(single_leaves)
  for (path, a), b in zip(multi_leaves, single_leaves):
    np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6,
        err_msg=f'{jax.tree_util.keystr(path)}: two processes x 4 devices '
        'and one process x 8 devices trained different parameters; check '
        'that each process reads its rows of the same global batches.')

  # One process with 8 devices resumes the two-process checkpoint.
  offsets = []
  original = pipeline.TrainStream.batch_at

  def recording_batch_at(self, offset):
    offsets.append(offset)
    return original(self, offset)

  monkeypatch.setattr(pipeline.TrainStream, 'batch_at', recording_batch_at)
  resumed = train.train_and_evaluate(
      main_processes.tiny_config(data_dir, **{**overrides, 'num_steps': 9}),
      multi_dir)
  assert resumed['meta']['step'] == 9
  assert resumed['meta']['num_processes'] == 1
  assert min(offsets) == 6 * config.train.batch_size
  assert checkpointing.create_manager(
      multi_dir, read_only=True).all_steps() == [3, 6, 9]


def test_initialize_on_without_a_cluster_says_what_to_pass(monkeypatch):
  def no_cluster():
    raise ValueError('coordinator_address should be defined.')

  monkeypatch.setattr(jax.distributed, 'initialize', no_cluster)
  with pytest.raises(ValueError, match='pass --coordinator_address'):
    distributed.initialize('on')
