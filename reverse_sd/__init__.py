"""reverse_sd: predict the prompt embedding of a Stable Diffusion image."""

from reverse_sd import host_memory as _host_memory
from reverse_sd import xla_cpu as _xla_cpu

# XLA:CPU flags (YNNPACK fusions off; opt-in oneDNN: see xla_cpu.py), set
# before any JAX backend starts: XLA reads XLA_FLAGS then.
_xla_cpu.apply_defaults()
# glibc keeps freed blocks for the next step instead of unmapping them
# (host_memory.py).
_host_memory.apply_defaults()
