"""models/cpu_kernels.py: the FFI library's build, cache and selection."""

import os
import subprocess
import sys
import textwrap

import pytest

from reverse_sd.models import cpu_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_failed_build_names_the_command(monkeypatch, tmp_path):
  monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
  monkeypatch.setenv('CXX', 'false')
  with pytest.raises(RuntimeError,
                     match='`false .*cpu_attention.cc.*` failed'):
    cpu_kernels.build()
  assert not list(tmp_path.iterdir())  # No partial library left behind.


def test_the_build_is_cached_and_keyed_by_the_sources(monkeypatch, tmp_path):
  path = cpu_kernels.build()  # Built already by this process's first use.
  mtime = path.stat().st_mtime_ns
  assert cpu_kernels.build() == path
  assert path.stat().st_mtime_ns == mtime  # Not rebuilt.
  # An edited source gets a new library name (so a new build).
  source = tmp_path / 'cpu_attention.cc'
  source.write_text(cpu_kernels.SOURCES[0].read_text() + '\n// edit\n')
  monkeypatch.setattr(cpu_kernels, 'SOURCES',
                      (source, *cpu_kernels.SOURCES[1:]))
  assert cpu_kernels.library_path(cpu_kernels._compiler()) != path  # pylint: disable=protected-access


def test_single_device_process_uses_the_kernels():
  # The tests run on 8 fake devices; a plain CPU process (the benchmarks,
  # the main job on a workstation) has one, where 'auto' picks the kernels.
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp
      from reverse_sd.models import conv, vit
      x = jnp.zeros((2, 8, 8, 3)); k = jnp.zeros((3, 3, 3, 4))
      assert jax.device_count() == 1
      assert conv.resolve_grad_impl('auto', x, k) == 'cpu_kernel'
      model = vit.VisionTransformer(vit.VARIANTS['tiny'])
      images = jnp.zeros((1, 32, 32, 3))
      params = model.init(jax.random.key(0), images)
      text = str(jax.make_jaxpr(jax.grad(
          lambda p: model.apply(p, images).sum()))(params))
      assert 'rsd_attention_backward' in text, text[:500]
      assert 'rsd_layer_norm_backward' in text, text[:500]
      from reverse_sd import optim
      grads = {'a': jnp.ones((3, 5)), 'b': jnp.ones((7,))}
      text = str(jax.make_jaxpr(optim.global_norm)(grads))
      assert 'rsd_sum_squares' in text, text[:500]
      print('ok')
  ''')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('ok')
