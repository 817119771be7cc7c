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
      from reverse_sd.models import convnet
      net = convnet.ConvNet(convnet.VARIANTS['tiny'])
      small = jnp.zeros((2, 16, 16, 3))
      net_params = net.init(jax.random.key(0), small)
      text = str(jax.make_jaxpr(jax.grad(
          lambda p: net.apply(p, small).sum()))(net_params))
      assert 'rsd_conv_forward' in text, text[:500]
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


def test_the_other_vector_width_gives_the_same_results(tmp_path):
  # This CPU's build is tested everywhere else; here the other one (the
  # 8-lane build on an AVX-512 CPU, or the 16-lane one where it can run),
  # in a fresh cache: the convolution's forward pass and gradients, and the
  # LayerNorm's, against XLA.
  flags = cpu_kernels._cpu_flags() or frozenset()  # pylint: disable=protected-access
  if not cpu_kernels._is_x86() or not all(  # pylint: disable=protected-access
      f in flags for f in cpu_kernels.AVX512_FEATURES):
    pytest.skip('needs an AVX-512 CPU to run both builds')
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np
      from reverse_sd.models import conv, cpu_kernels
      assert '-mavx512f' not in cpu_kernels._compile_flags()
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(3, 11, 10, 7)), jnp.float32)
      k = jnp.asarray(rng.normal(size=(3, 3, 7, 40)), jnp.float32)
      b = jnp.asarray(rng.normal(size=(40,)), jnp.float32)
      def run(impl):
        fn = lambda x, k, b: conv.conv_bias_act(x, k, b, (2, 2), 'SAME',
                                                'relu', impl)
        loss = lambda x, k, b: jnp.sum(fn(x, k, b) ** 2)
        return (fn(x, k, b), *jax.grad(loss, argnums=(0, 1, 2))(x, k, b))
      for a, c in zip(run('xla'), run('cpu_kernel')):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4)
      from reverse_sd.models import layer_norm
      for shape in ((3, 5, 40), (4, 13)):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        w = jnp.asarray(rng.normal(size=shape), jnp.float32)
        def ln(impl):
          m = layer_norm.LayerNorm(impl=impl)
          p = m.init(jax.random.key(0), x)
          loss = lambda p, x: jnp.sum(m.apply(p, x) * w)
          return (m.apply(p, x), *jax.tree.leaves(
              jax.grad(loss, argnums=(0, 1))(p, x)))
        for a, c in zip(ln('xla'), ln('cpu_kernel')):
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
