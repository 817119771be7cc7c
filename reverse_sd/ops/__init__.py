"""The op layer: each op's reference and its backend implementations.

Models are plain Flax math; where an op has more than one implementation,
the choice lives here and is made once, when a model is built, from the
config and the backend (`reverse_model.create_model`), never from the device
count while tracing.

  attention.py   softmax attention: 'xla' (the reference path), 'cudnn'
                 (GPU), 'pallas_tpu' (TPU flash attention), 'pallas_gpu'
                 (Triton); `config.model.attention`.
  conv.py        convolution + bias + activation: 'xla', or the
                 'cpu_kernel' FFI kernel; `config.model.conv`.
  platform.py    the backend name and its default compute dtype.
  cpu/           the CPU part: the C++ kernel sources and their build
                 (`cpu/kernels.py`), and `cpu/tuning.py`, the process
                 tuning that entry points apply by one explicit call.

LayerNorm, dense products and the gradients' global norm are
`flax.linen.LayerNorm`, `flax.linen.Dense` and `optax` on every backend: XLA
fuses them well on GPU and TPU, and their CPU kernels did not speed the
default job's train step by the 1.15x a CPU kernel must earn
(benchmarks/RESULTS.md, "CPU kernels: what stayed").

Importing this package changes nothing in the process; no kernel is built
until a model asks for it.
"""
