"""ops/cpu/kernels.py: the FFI library's build, cache and registration."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from reverse_sd.ops.cpu import kernels as cpu_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def built():
  """The library's path; skips (saying why) where the kernels cannot build
  or load on this machine."""
  reason = cpu_kernels.unavailable_reason()
  if reason is not None:
    pytest.skip(f'CPU kernels unavailable: {reason}')
  return cpu_kernels.build()


def test_a_failed_build_names_the_command(monkeypatch, tmp_path):
  failing = tmp_path / 'failing-cxx'  # A compiler that always fails.
  failing.write_text('#!/bin/sh\necho "no, not today" >&2\nexit 1\n')
  failing.chmod(0o755)
  cache = tmp_path / 'cache'
  monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(cache))
  monkeypatch.setenv('CXX', str(failing))
  with pytest.raises(RuntimeError, match=(
      '`.*failing-cxx .*conv.cc.*` failed:\nno, not today')):
    cpu_kernels.build()
  assert not list(cache.iterdir())  # No partial library left behind.


def test_no_compiler_is_named(monkeypatch, tmp_path):
  monkeypatch.delenv('CXX', raising=False)
  monkeypatch.setenv('PATH', str(tmp_path))
  with pytest.raises(RuntimeError, match=r'no C\+\+ compiler'):
    cpu_kernels.build()


def test_the_build_is_cached_and_keyed_by_the_sources(built, monkeypatch,
                                                      tmp_path):
  mtime = built.stat().st_mtime_ns
  assert cpu_kernels.build() == built
  assert built.stat().st_mtime_ns == mtime  # Not rebuilt.
  # An edited source gets a new library name (so a new build).
  source = tmp_path / 'conv.cc'
  source.write_text(cpu_kernels.SOURCES[0].read_text() + '\n// edit\n')
  monkeypatch.setattr(cpu_kernels, 'SOURCES',
                      (source, *cpu_kernels.SOURCES[1:]))
  assert cpu_kernels.library_path(cpu_kernels._compiler()) != built  # pylint: disable=protected-access


def test_the_library_exports_every_target(built):
  library = ctypes.CDLL(str(built))
  assert all(name.startswith('rsd_conv') for name in cpu_kernels.TARGETS)
  for name, symbol in cpu_kernels.TARGETS.items():
    assert hasattr(library, symbol), f'{built} lacks {symbol} ({name})'


def test_a_cpu_without_avx2_is_named(monkeypatch):
  if not cpu_kernels._is_x86():  # pylint: disable=protected-access
    pytest.skip('x86 flags')
  monkeypatch.setattr(cpu_kernels, '_cpu_flags',
                      lambda: frozenset({'avx', 'fma'}))
  assert cpu_kernels._cpu_unsupported() == 'the CPU lacks avx2'  # pylint: disable=protected-access
  monkeypatch.setattr(cpu_kernels, '_cpu_flags', lambda: None)
  assert '/proc/cpuinfo' in cpu_kernels._cpu_unsupported()  # pylint: disable=protected-access


def test_a_plain_process_uses_the_kernels(built):
  # The tests run on 8 fake devices; a plain CPU process (the benchmarks,
  # the main job on a workstation) has one, and 'auto' takes the kernel
  # there too.
  del built
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp
      from configs import synthetic
      from reverse_sd.models import reverse_model
      assert jax.device_count() == 1
      model = reverse_model.create_model(synthetic.get_config('tiny').model)
      assert model.backbone.conv.implementation == 'cpu_kernel'
      images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
      params = model.init(jax.random.key(0), images)
      text = str(jax.make_jaxpr(jax.grad(
          lambda p: model.apply(p, images)['embedding'].sum()))(params))
      assert 'rsd_conv_forward' in text, text[:500]
      assert 'rsd_conv_kernel_grad' in text, text[:500]
      print('ok')
  ''')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('ok')


def test_avx512_flags_follow_the_cpu_and_the_switch(monkeypatch):
  if not cpu_kernels._is_x86():  # pylint: disable=protected-access
    pytest.skip('x86 flags')
  full = frozenset({'avx2', 'fma', *cpu_kernels.AVX512_FEATURES})
  monkeypatch.setattr(cpu_kernels, '_cpu_flags', lambda: full)
  assert '-mavx512f' in cpu_kernels._compile_flags()  # pylint: disable=protected-access
  monkeypatch.setenv(cpu_kernels.AVX512_ENV, '0')
  assert '-mavx512f' not in cpu_kernels._compile_flags()  # pylint: disable=protected-access
  monkeypatch.delenv(cpu_kernels.AVX512_ENV)
  monkeypatch.setattr(cpu_kernels, '_cpu_flags',
                      lambda: frozenset({'avx2', 'fma', 'avx512f'}))
  assert '-mavx512f' not in cpu_kernels._compile_flags()  # pylint: disable=protected-access


def test_the_other_vector_width_gives_the_same_results(built, tmp_path):
  # This CPU's (16-lane) build is tested everywhere else; here the 8-lane
  # (AVX2) one, built in a fresh cache: the convolution's forward pass and
  # gradients against xla.
  del built
  flags = cpu_kernels._cpu_flags() or frozenset()  # pylint: disable=protected-access
  if not cpu_kernels._is_x86() or not all(  # pylint: disable=protected-access
      f in flags for f in cpu_kernels.AVX512_FEATURES):
    pytest.skip('needs an AVX-512 CPU to run both builds')
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np
      from reverse_sd.ops import conv
      from reverse_sd.ops.cpu import kernels
      assert '-mavx512f' not in kernels._compile_flags()
      assert kernels.unavailable_reason() is None, kernels.unavailable_reason()
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(3, 11, 10, 7)), jnp.float32)
      k = jnp.asarray(rng.normal(size=(3, 3, 7, 40)), jnp.float32)
      b = jnp.asarray(rng.normal(size=(40,)), jnp.float32)
      def run(implementation):
        op = conv.ConvOp(implementation, strict=True)
        fn = lambda x, k, b: op(x, k, b, (2, 2), 'SAME', 'relu')
        loss = lambda x, k, b: jnp.sum(fn(x, k, b) ** 2)
        return (fn(x, k, b), *jax.grad(loss, argnums=(0, 1, 2))(x, k, b))
      for a, c in zip(run('xla'), run('cpu_kernel')):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4)
      print('ok')
  ''')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             **{cpu_kernels.AVX512_ENV: '0',
                cpu_kernels.CACHE_ENV: str(tmp_path)})
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('ok')
