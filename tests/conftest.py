"""Test set-up: 8 fake CPU devices, shared tiny fixtures."""

import os
import warnings

# Must be set before JAX initialises its backends.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import pytest

# The tiny SD U-Net's cross_attention_dim (tests/golden/tiny_sd/unet/
# config.json).
TINY_SD_CROSS_ATTENTION_DIM = 32


@pytest.fixture(scope='module')
def context_file(tmp_path_factory):
  """A random [77, D] .npy context for the tiny SD U-Net ('file' context)."""
  path = tmp_path_factory.mktemp('context') / 'context.npy'
  rng = np.random.default_rng(0)
  np.save(path, rng.normal(size=(77, TINY_SD_CROSS_ATTENTION_DIM)).astype(
      np.float32))
  return path


def pytest_configure(config):
  """Builds the C++ FFI kernels once, before the xdist workers start.

  Otherwise every worker that first uses them compiles the same library at
  the same time (about 20 s of CPU each on a fresh machine).
  """
  if hasattr(config, 'workerinput'):  # An xdist worker: the controller built.
    return
  # pylint: disable=g-import-not-at-top
  from reverse_sd.ops.cpu import kernels as cpu_kernels
  try:
    cpu_kernels.build()
  except (RuntimeError, OSError):
    pass  # The tests that need the kernels say why they cannot run.


# --- The fast tier ------------------------------------------------------------
# `bash launch/test.sh --fast` runs `pytest -m "not slow"`: every module's unit
# tests, without the tests below, which only the full suite (the default,
# .ci/run) runs. Chosen from `--durations=0` of a full run (-n 2
# --dist=loadfile, 2-core EPYC, 2026-12-06, load 8-10): a test or fixture of
# about 10 s or more there, or one that trains, starts processes or runs a
# kernel interpreter. Keep `--fast` under 4 min on such a machine.
# Marking is here, not in the test files, so the list reads in one place; a
# renamed test drops out of it with a warning (below), not silently.

# Whole files: every test trains, starts processes or needs a trained run.
SLOW_FILES = (
    'tests/test_preemption.py',      # Kills and resumes multi-process runs.
    'tests/test_real_data_run.py',   # Short runs on cached CLIP features.
    'tests/test_no_compiler.py',     # A tiny job in a compiler-less PATH.
    'tests/test_loop.py',            # The whole miniature loop, tiny.
)

# Module-scoped fixtures that train a tiny run (their time shows as the first
# user's 'setup'): every test that uses one is slow; the file's other tests
# stay fast.
SLOW_FIXTURES = {
    'tests/test_analyze.py': ('workdir',),
    'tests/test_caption_context.py': ('caption_run',),
    'tests/test_curriculum.py': ('baseline',),
    'tests/test_predict.py': ('trained',),
    'tests/test_whitebox.py': ('trained', 'tiny_model'),
    'tests/test_ops_attention.py': ('tpu_kernel_errors',),  # TPU interpreter.
    'tests/test_trained_run.py': ('trained',),
    'tests/test_loop_referee.py': ('trained',),
}

# Single tests: a function (every parametrization) or one parametrization.
# pylint: disable=line-too-long
SLOW_TESTS = (
    # Multi-process run against a one-process run, and its resume.
    'tests/test_multihost.py::test_two_processes_match_one_and_a_single_process_resumes',
    'tests/test_multihost.py::test_process_rows_make_the_global_batch',
    # Every sharding preset's train step against the replicated one.
    'tests/test_sharding_presets.py::test_sharded_steps_match_replicated',
    # CLI training runs.
    'tests/test_end_to_end.py::test_cli_tiny_run_writes_results',
    'tests/test_end_to_end.py::test_killed_run_resumes_same_stream',
    'tests/test_end_to_end.py::test_vocabulary_head_run_reports_word_metrics',
    'tests/test_end_to_end.py::test_checkpoint_of_another_model_is_refused',
    'tests/test_curriculum.py::test_killed_curriculum_run_resumes_mid_stage',
    # White-box U-Net: VAE latents and the SD context.
    'tests/test_whitebox.py::test_empty_prompt_context',
    # Gradients and 8 devices against 1 on the full train step.
    'tests/test_train_step.py::test_vocabulary_bce_gradient_reaches_the_head',
    'tests/test_train_step.py::test_eight_devices_match_one',
    # Lowering the whole train step for TPU and GPU.
    'tests/test_accelerator_lowering.py::test_train_step_lowers_with_the_fused_kernel',
    # The Pallas GPU kernel in interpret mode; attention under shard_map.
    'tests/test_ops_attention.py::test_gpu_kernel_equals_reference',
    'tests/test_ops_attention.py::test_kernel_under_shard_map_equals_reference',
    'tests/test_ops_attention.py::test_xla_implementation_equals_reference',
    # Benchmark scripts' workers: build, time and profile small models.
    'tests/test_benchmarks_smoke.py::test_ab_step_builds_both_versions_and_times_them',
    'tests/test_benchmarks_smoke.py::test_jax_measurement_counts_flops_on_a_tiny_model',
    'tests/test_benchmarks_smoke.py::test_kernels_jax_worker_times_every_kernel_and_reports',
    'tests/test_benchmarks_smoke.py::test_profile_attributes_op_time_to_the_model_code',
    # The larger towers (one size of each stays fast), bfloat16 compute.
    'tests/test_models.py::test_output_shape_and_unit_norm[clip_resnet-tiny-32]',
    'tests/test_models.py::test_output_shape_and_unit_norm[vit-small-64]',
    'tests/test_models.py::test_bfloat16_compute_keeps_float32_params',
    'tests/test_models.py::test_encoder_layer_query_tokens_equal_the_full_layer_rows',
    # Subprocesses that start JAX with other malloc settings.
    'tests/test_cpu_tuning.py::test_freed_blocks_are_reused_not_faulted_in_again',
    'tests/test_cpu_tuning.py::test_the_users_choice_wins_and_is_logged',
    'tests/test_cpu_tuning.py::test_a_cpu_process_gets_the_malloc_settings_and_logs_them',
    # Command lines run in a subprocess (start JAX, load data).
    'tests/test_multihost.py::test_incomplete_flags_fail_before_anything_runs',
    'tests/test_end_to_end.py::test_override_typo_fails_before_running',
    'tests/test_dakl.py::test_command_line',
    'tests/test_curriculum.py::test_score_command_names_a_directory_that_is_not_a_run',
    # Full-size comparisons against diffusers and the MiniLM golden numbers.
    'tests/test_sd_unet.py::test_unet_stages_match_diffusers',
    'tests/test_caption_context.py::test_model_reads_the_context_of_each_example',
    'tests/test_minilm.py::test_small_batches_keep_the_input_order',
    'tests/test_minilm.py::test_batching_and_bucketing_do_not_change_results',
    # The referee's resumed training against an uninterrupted one.
    'tests/test_loop_referee.py::test_killed_training_resumes_the_same_stream',
    # The AVX2 build of the CPU kernels, next to this CPU's.
    'tests/test_cpu_kernels.py::test_the_other_vector_width_gives_the_same_results',
)
# pylint: enable=line-too-long


def _file_of(nodeid):
  return nodeid.split('::', 1)[0]


def _stale_entries(config, modules):
  """Listed files that do not exist, and listed tests or fixtures that their
  (collected) module does not define."""
  stale = [f for f in (*SLOW_FILES, *SLOW_FIXTURES, *map(_file_of, SLOW_TESTS))
           if not (config.rootpath / f).is_file()]
  names = [entry.split('[', 1)[0].split('::') for entry in SLOW_TESTS]
  names += [(f, name) for f, fixtures in SLOW_FIXTURES.items()
            for name in fixtures]
  stale += [f'{f}::{name}' for f, name in names
            if f in modules and not hasattr(modules[f], name)]
  return sorted(set(stale))


def pytest_collection_modifyitems(config, items):
  """Marks the tests listed above `slow`; warns about a stale entry."""
  slow_tests = set(SLOW_TESTS)
  modules = {}
  for item in items:
    file_name = _file_of(item.nodeid)
    if getattr(item, 'module', None) is not None:
      modules[file_name] = item.module
    if (file_name in SLOW_FILES or
        item.nodeid in slow_tests or
        item.nodeid.split('[', 1)[0] in slow_tests or
        set(SLOW_FIXTURES.get(file_name, ())) & set(item.fixturenames)):
      item.add_marker(pytest.mark.slow)
  stale = _stale_entries(config, modules)
  if stale:
    warnings.warn(pytest.PytestConfigWarning(
        'tests/conftest.py lists slow tests, fixtures or files that do not '
        f'exist (renamed?): {stale}'))
