"""Helpers of the tests that lower steps for accelerators from this CPU host
(`jax.export`, nothing compiled)."""

import contextlib
from unittest import mock

from jax._src.cudnn import fused_attention_stablehlo


@contextlib.contextmanager
def cudnn_present():
  """jax asks the CUDA plugin for cuDNN's version before it lowers cuDNN's
  attention; this CPU-only jaxlib has none, so say 9.10."""
  with mock.patch.object(fused_attention_stablehlo, 'check_cudnn_version',
                         return_value=91000):
    yield
