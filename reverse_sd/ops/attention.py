"""Multi-head softmax attention: one op, one implementation per backend.

    out = softmax(q k^T * scale [+ causal mask]) v

with q [B, Q, H, D], k and v [B, T, H, D] and scale 1/sqrt(D). The
implementations (`IMPLEMENTATIONS`):

  'xla'         `jax.nn.dot_product_attention(implementation='xla')`: XLA's
                unfused ops. Runs everywhere, any shape, mask and dtype.
  'cudnn'       cuDNN's fused flash attention on NVIDIA GPUs
                (`jax.nn.dot_product_attention(implementation='cudnn')`):
                bfloat16 or float16, head dim a multiple of 8 and at most 128
                (256 on Hopper and later), no mask other than causal; odd
                sequence lengths are padded by one and masked by length.
  'pallas_tpu'  the Pallas TPU flash attention kernel that ships with jax
                (`jax.experimental.pallas.ops.tpu.flash_attention`), forward
                and backward. Sequences are padded to a multiple of 128 and
                the padding is masked out with segment ids.
  'pallas_gpu'  the Pallas (Triton) GPU attention kernel that ships with jax
                (`jax.experimental.pallas.ops.gpu.attention.mha`). Its
                segment ids are shared by queries and keys, so padded
                shapes need Q <= T.

The implementation is chosen once, when a model is built, by `choose(name,
platform, mesh)` from the config (`config.model.attention`: 'auto' or a
name) and the backend: 'auto' is 'pallas_tpu' on TPU, 'cudnn' on GPU (the
fused kernel JAX documents for NVIDIA GPUs, and the one maxtext's
`cudnn_flash_te` uses) and 'xla' on CPU. It never depends on the device
count. With 'auto', a call whose shape, dtype or mask the chosen kernel cannot
run falls back to 'xla' (logged once per shape); a kernel named in the config
raises instead, naming the op, the shape and what can run it.

Sharding. A fused kernel is a custom call that the SPMD partitioner cannot
split, so with a mesh of more than one device it runs inside `jax.shard_map`:
the batch split over the mesh's batch axes ('data', 'fsdp'), the heads over
'model' where the mesh has it and it divides them. That is also what lets
cuDNN's kernel lower without its host-callback partitioning rule.

Precision. Every fused kernel accumulates the logits and the softmax in
float32 whatever the input dtype, which is what diffusers' `upcast_attention`
asks for; `upcast=True` therefore only changes the 'xla' path, which then
computes in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from reverse_sd.ops import platform as ops_platform

XLA = 'xla'
CUDNN = 'cudnn'
PALLAS_TPU = 'pallas_tpu'
PALLAS_GPU = 'pallas_gpu'
IMPLEMENTATIONS = (XLA, CUDNN, PALLAS_TPU, PALLAS_GPU)
AUTO = 'auto'
CHOICES = (AUTO,) + IMPLEMENTATIONS
# What each backend can run; 'auto' takes the first.
PLATFORM_IMPLEMENTATIONS = {
    'cpu': (XLA,),
    'gpu': (CUDNN, XLA, PALLAS_GPU),
    'cuda': (CUDNN, XLA, PALLAS_GPU),
    'rocm': (XLA,),
    'tpu': (PALLAS_TPU, XLA),
}
# Mesh axes that split the batch, and the axis that splits heads
# (reverse_sd/sharding.py's names).
BATCH_AXES = ('data', 'fsdp')
HEAD_AXIS = 'model'
# Sequence padding of the Pallas kernels (a TPU lane tile; a Triton block).
PAD_TO = 128
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def reference(q_BxQxHxD, k_BxTxHxD, v_BxTxHxD, *, causal: bool = False,
              mask=None):
  """The op in plain jax.numpy, float32 throughout: the tests' yardstick."""
  q, k, v = (x.astype(jnp.float32) for x in (q_BxQxHxD, k_BxTxHxD, v_BxTxHxD))
  logits = jnp.einsum('bqhd,bthd->bhqt', q, k) / math.sqrt(q.shape[-1])
  allowed = jnp.ones(logits.shape[-2:], jnp.bool_)
  if causal:
    allowed = jnp.tril(allowed)
  if mask is not None:
    allowed = allowed & mask
  logits = jnp.where(allowed, logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqt,bthd->bqhd', probs, v).astype(q_BxQxHxD.dtype)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _cudnn_head_dim_limit() -> int:
  """256 on Hopper and later, else 128 (cuDNN's flash attention)."""
  try:
    gpus = jax.devices('gpu')
    major = int(str(gpus[0].compute_capability).split('.')[0])
  except (RuntimeError, ValueError, AttributeError, IndexError):
    return 128
  return 256 if major >= 9 else 128


def _unsupported(implementation: str, q, k, v, causal: bool, mask,
                 head_dim_limit: int) -> str | None:
  """Why `implementation` cannot run this call (None: it can)."""
  if implementation == XLA:
    return None
  if q.ndim != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
    return 'it needs q [B, Q, H, D] and k, v [B, T, H, D]'
  if mask is not None:
    return 'it takes no mask but the causal one'
  head_dim = q.shape[-1]
  if implementation == CUDNN:
    if q.dtype not in _CUDNN_DTYPES:
      return f'it runs bfloat16 or float16, not {q.dtype}'
    if head_dim % 8 or head_dim > head_dim_limit:
      return (f'it needs a head dim that is a multiple of 8 and at most '
              f'{head_dim_limit}, not {head_dim}')
  if implementation == PALLAS_GPU:
    queries, keys = q.shape[1], k.shape[1]
    padded = queries % PAD_TO or keys % PAD_TO
    if padded and queries > keys:
      return ('its padding mask is shared by queries and keys, so it needs '
              f'Q <= T or lengths that are multiples of {PAD_TO}')
    if causal and queries != keys:
      return 'causal attention needs Q == T'
  if implementation == PALLAS_TPU and causal and q.shape[1] != k.shape[1]:
    return 'causal attention needs Q == T'
  return None


@functools.cache
def _log_fallback(implementation: str, shape: str, reason: str) -> None:
  logging.info('attention: %s cannot run %s (%s); using xla for it.',
               implementation, shape, reason)


def _describe(q, k, causal, mask) -> str:
  parts = [f'q {tuple(q.shape)} {q.dtype}', f'k/v {tuple(k.shape)}']
  if causal:
    parts.append('causal')
  if mask is not None:
    parts.append(f'mask {tuple(mask.shape)}')
  return ', '.join(parts)


def _padding_ids(length: int, padded: int, batch: int):
  """[B, padded] int32: 1 on the `length` real positions, 0 on padding."""
  ids = (jnp.arange(padded) < length).astype(jnp.int32)
  return jnp.broadcast_to(ids, (batch, padded))


def _pad_sequence(x_BxTxHxD, padded: int):
  extra = padded - x_BxTxHxD.shape[1]
  return jnp.pad(x_BxTxHxD, ((0, 0), (0, extra), (0, 0), (0, 0)))


def _tpu_block(length: int) -> int:
  return 512 if length % 512 == 0 else PAD_TO


def _pallas_tpu(q, k, v, causal: bool, interpret: bool):
  """Pallas TPU flash attention on [B, Q, H, D] inputs, padded and masked."""
  # Imported here: Pallas TPU (Mosaic) loads only where this kernel runs.
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention as flash  # pylint: disable=g-import-not-at-top
  batch, queries, _, head_dim = q.shape
  keys = k.shape[1]
  q_len, kv_len = _round_up(queries, PAD_TO), _round_up(keys, PAD_TO)
  to_bhtd = lambda x, n: _pad_sequence(x, n).transpose(0, 2, 1, 3)
  segment_ids = None
  if (q_len, kv_len) != (queries, keys):
    segment_ids = flash.SegmentIds(_padding_ids(queries, q_len, batch),
                                   _padding_ids(keys, kv_len, batch))
  block_q, block_k = _tpu_block(q_len), _tpu_block(kv_len)
  blocks = flash.BlockSizes(
      block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
      block_q_major_dkv=block_q, block_k_major_dkv=block_k,
      block_k_dkv=block_k, block_q_dkv=block_q, block_k_major_dq=block_k,
      block_k_dq=block_k, block_q_dq=block_q)
  call = functools.partial(flash.flash_attention, causal=causal,
                           sm_scale=1.0 / math.sqrt(head_dim),
                           block_sizes=blocks)
  args = (to_bhtd(q, q_len), to_bhtd(k, kv_len), to_bhtd(v, kv_len), None,
          segment_ids)
  if interpret:
    with pltpu.force_tpu_interpret_mode():
      out = call(*args)
  else:
    out = call(*args)
  return out.transpose(0, 2, 1, 3)[:, :queries]


def _pallas_gpu(q, k, v, causal: bool, interpret: bool):
  """Pallas (Triton) GPU attention on [B, Q, H, D] inputs, padded and
  masked."""
  # Imported here: Pallas Triton loads only where this kernel runs.
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=g-import-not-at-top
  batch, queries, _, head_dim = q.shape
  keys = k.shape[1]
  segment_ids = None
  if queries % PAD_TO or keys % PAD_TO:
    length = _round_up(max(queries, keys), PAD_TO)
    q, k, v = (_pad_sequence(x, length) for x in (q, k, v))
    segment_ids = _padding_ids(keys, length, batch)
  blocks = gpu_attention.BlockSizes(
      block_q=PAD_TO, block_k=PAD_TO, block_q_dkv=32, block_kv_dkv=32,
      block_q_dq=32, block_kv_dq=32)
  out = gpu_attention.mha(q, k, v, segment_ids,
                          sm_scale=1.0 / math.sqrt(head_dim), causal=causal,
                          block_sizes=blocks, interpret=interpret)
  return out[:, :queries]


def _cudnn(q, k, v, causal: bool):
  """cuDNN's flash attention. Its training kernels take even sequence
  lengths only (jax 0.10's check), so odd ones (a ViT's 197 or 257 tokens, a
  read-out's one query) are padded by one and masked by length."""
  batch, queries, _, _ = q.shape
  keys = k.shape[1]
  if queries % 2 == 0 and keys % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation='cudnn')
  q = _pad_sequence(q, _round_up(queries, 2))
  k, v = (_pad_sequence(x, _round_up(keys, 2)) for x in (k, v))
  out = jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation='cudnn',
      query_seq_lengths=jnp.full((batch,), queries, jnp.int32),
      key_value_seq_lengths=jnp.full((batch,), keys, jnp.int32))
  return out[:, :queries]


def _xla(q, k, v, causal: bool, mask, upcast: bool):
  dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                     implementation='xla')
  return out.astype(dtype)


def _split_specs(mesh: Mesh | None, q, k) -> P | None:
  """The shard_map spec of q, k, v and the output, or None (no shard_map)."""
  if mesh is None or mesh.size == 1:
    return None
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  batch_size = math.prod(mesh.shape[a] for a in batch_axes)
  if batch_axes and q.shape[0] % batch_size:
    batch_axes = ()
  heads = q.shape[2]
  head_axis = (HEAD_AXIS if HEAD_AXIS in mesh.axis_names and
               heads % mesh.shape[HEAD_AXIS] == 0 else None)
  del k
  return P(batch_axes or None, None, head_axis, None)


@dataclasses.dataclass(frozen=True)
class Attention:
  """The attention op as chosen for one model (see the module docstring).

  Call it as `op(q, k, v, causal=..., mask=..., upcast=...)`.

  Attributes:
    implementation: one of `IMPLEMENTATIONS`.
    strict: raise (instead of falling back to 'xla') on a call the kernel
      cannot run: the kernel was named in the config, not chosen by 'auto'.
    mesh: the mesh the model runs on; fused kernels run inside `shard_map`
      over it (None: called directly, as on one device).
    interpret: run the Pallas kernels in interpret mode (tests on CPU).
    head_dim_limit: cuDNN's largest head dim on this GPU.
  """
  implementation: str = XLA
  strict: bool = False
  mesh: Mesh | None = None
  interpret: bool = False
  head_dim_limit: int = 128

  def implementation_for(self, q, k, v, causal: bool = False,
                         mask=None) -> str:
    """The implementation that runs this call ('xla' where the kernel
    cannot, unless `strict`, which raises)."""
    reason = _unsupported(self.implementation, q, k, v, causal, mask,
                          self.head_dim_limit)
    if reason is None:
      return self.implementation
    shape = _describe(q, k, causal, mask)
    if self.strict:
      can_run = [name for name in IMPLEMENTATIONS if _unsupported(
          name, q, k, v, causal, mask, self.head_dim_limit) is None]
      raise ValueError(
          f'attention implementation {self.implementation!r} cannot run '
          f'{shape}: {reason}. Implementations that can: '
          f"{', '.join(can_run)} (config.model.attention; 'auto' falls back "
          'to xla per call).')
    _log_fallback(self.implementation, shape, reason)
    return XLA

  def __call__(self, q_BxQxHxD, k_BxTxHxD, v_BxTxHxD, *, causal: bool = False,
               mask=None, upcast: bool = False):
    """softmax(q k^T / sqrt(D) [causal]) v -> [B, Q, H, D].

    Args:
      q_BxQxHxD: queries.
      k_BxTxHxD: keys.
      v_BxTxHxD: values.
      causal: query i attends to keys j <= i (Q == T).
      mask: optional boolean mask broadcastable to [B, H, Q, T], True where a
        query may attend; only 'xla' takes one.
      upcast: compute the 'xla' path in float32 (the fused kernels always
        accumulate in float32).
    """
    q, k, v = q_BxQxHxD, k_BxTxHxD, v_BxTxHxD
    implementation = self.implementation_for(q, k, v, causal, mask)
    if implementation == XLA:
      return _xla(q, k, v, causal, mask, upcast)
    dtype = q.dtype
    k, v = k.astype(dtype), v.astype(dtype)
    if implementation == CUDNN:
      kernel = functools.partial(_cudnn, causal=causal)
    elif implementation == PALLAS_TPU:
      kernel = functools.partial(_pallas_tpu, causal=causal,
                                 interpret=self.interpret)
    else:
      kernel = functools.partial(_pallas_gpu, causal=causal,
                                 interpret=self.interpret)
    spec = _split_specs(self.mesh, q, k)
    if spec is not None:
      kernel = jax.shard_map(kernel, mesh=self.mesh, in_specs=(spec,) * 3,
                             out_specs=spec, check_vma=False)
    return kernel(q, k, v).astype(dtype)


def choose(name: str = AUTO, platform: str | None = None,
           mesh: Mesh | None = None, *, interpret: bool = False) -> Attention:
  """The attention op for `config.model.attention=name` on `platform`.

  Args:
    name: 'auto' or one of `IMPLEMENTATIONS`.
    platform: 'cpu', 'gpu' (or 'cuda'), 'tpu'; default: JAX's default
      backend. Pass the target platform when lowering for another one.
    mesh: the mesh the model runs on (fused kernels run under shard_map).
    interpret: run the Pallas kernels in interpret mode, on any platform
      (tests).

  Raises:
    ValueError: an unknown name, or one the platform cannot run.
  """
  if name not in CHOICES:
    raise ValueError(f'config.model.attention={name!r}: expected one of '
                     f'{CHOICES}.')
  platform = ops_platform.name(platform)
  runnable = PLATFORM_IMPLEMENTATIONS.get(platform, (XLA,))
  if interpret:
    runnable = runnable + tuple(
        n for n in (PALLAS_TPU, PALLAS_GPU) if n not in runnable)
  if name == AUTO:
    implementation = runnable[0]
  elif name in runnable:
    implementation = name
  else:
    raise ValueError(
        f'config.model.attention={name!r} cannot run on the {platform} '
        f"backend; it runs: {', '.join(runnable)} (or 'auto').")
  head_dim_limit = (_cudnn_head_dim_limit() if implementation == CUDNN and
                    ops_platform.name() == 'gpu' else 128)
  return Attention(implementation, strict=name != AUTO, mesh=mesh,
                   interpret=interpret, head_dim_limit=head_dim_limit)
