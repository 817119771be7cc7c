"""Test set-up: 8 fake CPU devices, shared tiny fixtures."""

import os

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
