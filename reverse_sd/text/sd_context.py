"""Stable Diffusion text context: prompts -> the U-Net's encoder_hidden_states.

Reproduces diffusers' `StableDiffusionPipeline.encode_prompt` (clip_skip
None) in the project's Flax: the SD folder's CLIP tokenizer
(`clip_tokenizer.ClipTokenizer`, padded to 77 tokens) and text encoder
(`clip_text.ClipTextTransformer`), output `last_hidden_state` after
`final_layer_norm` [N, 77, D], with D the U-Net's `cross_attention_dim`
(768 for SD 1.x, 1024 for SD 2.x). See `reverse_sd.models.clip_text` for why
SD 2.x's "penultimate layer" needs nothing special.

The white-box model conditions the generator's U-Net on the empty prompt
(the unconditional context of classifier-free guidance);
`empty_prompt_context` computes it once per text encoder and caches it as a
.npy file under `$REVERSE_SD_CACHE_DIR/sd_context/` (default
`~/.cache/reverse_sd/sd_context/`), keyed by the path, size and mtime of the
text encoder's weights and config and of the tokenizer files.

Expected SD folder layout (diffusers `save_pretrained` / a Hub snapshot):

  <sd_dir>/text_encoder/config.json, model[.variant].safetensors
  <sd_dir>/tokenizer/vocab.json + merges.txt (or tokenizer.json),
                     tokenizer_config.json / special_tokens_map.json
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import io
import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reverse_sd.convert import clip_text_weights as clip_text_convert
from reverse_sd.models import clip_text
from reverse_sd.text import clip_tokenizer

TEXT_ENCODER_SUBFOLDER = 'text_encoder'
TOKENIZER_SUBFOLDER = 'tokenizer'
CACHE_DIR_ENV = 'REVERSE_SD_CACHE_DIR'
CACHE_SUBFOLDER = 'sd_context'
# Bump when the computation changes, so old cache files are not reused.
_CACHE_FORMAT = 1

_EXPECTED_LAYOUT = (
    f'a diffusers Stable Diffusion folder has {TEXT_ENCODER_SUBFOLDER}/ '
    '(config.json and model.safetensors of a transformers CLIPTextModel) and '
    f'{TOKENIZER_SUBFOLDER}/ (vocab.json and merges.txt, or tokenizer.json, '
    'with tokenizer_config.json)')


def _subfolder(sd_dir: str | os.PathLike[str], name: str) -> pathlib.Path:
  sd_dir = pathlib.Path(sd_dir)
  if not sd_dir.is_dir():
    raise FileNotFoundError(f'Stable Diffusion folder not found: {sd_dir}')
  folder = sd_dir / name
  if not folder.is_dir():
    present = sorted(p.name for p in sd_dir.iterdir())
    raise FileNotFoundError(f'{folder}: not found; {_EXPECTED_LAYOUT}. '
                            f'{sd_dir} has {present}.')
  return folder


class SDTextEncoder:
  """An SD folder's tokenizer and text encoder, loaded once.

  Attributes:
    config: the text transformer's shape (`config.width` is D).
    tokenizer: the folder's CLIP tokenizer.
  """

  def __init__(self, sd_dir: str | os.PathLike[str], *,
               variant: str | None = None):
    """Loads `<sd_dir>/tokenizer` and `<sd_dir>/text_encoder`.

    Args:
      sd_dir: a diffusers Stable Diffusion folder.
      variant: weights variant, e.g. 'fp16' for model.fp16.safetensors.

    Raises:
      FileNotFoundError: tokenizer/ or text_encoder/ (or their files) are
        missing; the message says what is expected there.
      ValueError: the tokenizer and text encoder do not fit each other.
      core.ConversionError: the weights do not fit text_encoder/config.json.
    """
    tokenizer_dir = _subfolder(sd_dir, TOKENIZER_SUBFOLDER)
    encoder_dir = _subfolder(sd_dir, TEXT_ENCODER_SUBFOLDER)
    self.tokenizer = clip_tokenizer.ClipTokenizer.from_dir(tokenizer_dir)
    self.config, params = clip_text_convert.load_clip_text(encoder_dir,
                                                           variant=variant)
    if self.tokenizer.vocab_size > self.config.vocab_size:
      raise ValueError(
          f'{tokenizer_dir}: {self.tokenizer.vocab_size} tokens, but '
          f'{encoder_dir} embeds only {self.config.vocab_size}; are they from '
          'the same model?')
    if self.tokenizer.max_length > self.config.max_positions:
      raise ValueError(
          f'{tokenizer_dir}: model_max_length {self.tokenizer.max_length} > '
          f'max_position_embeddings {self.config.max_positions} of '
          f'{encoder_dir}')
    self._params = jax.device_put(params)
    model = clip_text.ClipTextTransformer(self.config)
    self._apply = jax.jit(
        lambda p, ids: model.apply({'params': p}, ids).last_hidden_state)

  def encode(self, prompts: Sequence[str], *,
             batch_size: int = 32) -> np.ndarray:
    """float32 [N, 77, D] context of each prompt (see `encode_prompts`)."""
    if isinstance(prompts, str):
      raise TypeError('prompts must be a sequence of strings, not one str')
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    ids_NxT = self.tokenizer.encode(prompts)
    width = self.config.width
    out = np.empty((len(prompts), ids_NxT.shape[1], width), np.float32)
    # Every batch is padded to batch_size (one compiled shape).
    batch_size = min(batch_size, max(len(prompts), 1))
    for start in range(0, len(prompts), batch_size):
      ids_BxT = ids_NxT[start:start + batch_size]
      count = len(ids_BxT)
      if count < batch_size:
        ids_BxT = np.concatenate(
            [ids_BxT, np.repeat(ids_BxT[:1], batch_size - count, axis=0)])
      hidden = self._apply(self._params, jnp.asarray(ids_BxT))
      out[start:start + count] = np.asarray(hidden[:count], np.float32)
    return out


def encode_prompts(sd_dir: str | os.PathLike[str], prompts: Sequence[str], *,
                   batch_size: int = 32,
                   variant: str | None = None) -> np.ndarray:
  """The Stable Diffusion context of each prompt, as diffusers computes it.

  `pipe.encode_prompt(prompt, ...)`'s prompt_embeds (clip_skip None):
  `text_encoder(tokenizer(prompt, padding='max_length', max_length=77,
  truncation=True).input_ids).last_hidden_state`.

  Args:
    sd_dir: a diffusers Stable Diffusion folder (see the module docstring).
    prompts: the prompts; longer ones are truncated to 77 tokens.
    batch_size: prompts per text-encoder call.
    variant: weights variant, e.g. 'fp16'.

  Returns:
    float32 [N, 77, D]; D is the U-Net's cross_attention_dim.

  Raises:
    FileNotFoundError: tokenizer/ or text_encoder/ is missing (names what is
      expected there).
  """
  return SDTextEncoder(sd_dir, variant=variant).encode(prompts,
                                                       batch_size=batch_size)


def cache_dir() -> pathlib.Path:
  """`$REVERSE_SD_CACHE_DIR/sd_context`, else ~/.cache/reverse_sd/sd_context."""
  root = os.environ.get(CACHE_DIR_ENV)
  root = (pathlib.Path(root) if root else
          pathlib.Path.home() / '.cache' / 'reverse_sd')
  return root / CACHE_SUBFOLDER


def _file_stats(folder: pathlib.Path) -> list[dict[str, Any]]:
  stats = []
  for path in sorted(folder.iterdir()):
    if path.is_file():
      stat = path.stat()
      stats.append({'path': str(path.resolve()), 'size': stat.st_size,
                    'mtime_ns': stat.st_mtime_ns})
  return stats


def cache_key(sd_dir: str | os.PathLike[str],
              variant: str | None = None) -> str:
  """Hex digest identifying the empty-prompt context of an SD folder.

  Changes when any file of text_encoder/ or tokenizer/ (weights, config,
  vocabulary) changes path, size or mtime, or when `variant` changes.
  """
  description = {
      'format': _CACHE_FORMAT,
      'variant': variant,
      TEXT_ENCODER_SUBFOLDER: _file_stats(
          _subfolder(sd_dir, TEXT_ENCODER_SUBFOLDER)),
      TOKENIZER_SUBFOLDER: _file_stats(_subfolder(sd_dir,
                                                  TOKENIZER_SUBFOLDER)),
  }
  blob = json.dumps(description, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename, so a reader
  never sees a partial file (and an interrupted write leaves none)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    pathlib.Path(tmp).unlink(missing_ok=True)


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def empty_prompt_context(sd_dir: str | os.PathLike[str], *,
                         variant: str | None = None,
                         use_cache: bool = True) -> np.ndarray:
  """The unconditional context `pipe.encode_prompt('')` gives, [77, D].

  Computed once per text encoder and cached as `<cache_dir()>/<key>.npy`
  (with a `<key>.json` saying what it was computed from); later calls read
  the file. A cache file that cannot be read or has the wrong shape is
  recomputed.

  Args:
    sd_dir: a diffusers Stable Diffusion folder.
    variant: weights variant, e.g. 'fp16'.
    use_cache: read and write the cache (False: always compute).

  Returns:
    float32 [77, D].

  Raises:
    FileNotFoundError: tokenizer/ or text_encoder/ is missing.
  """
  if not use_cache:
    return encode_prompts(sd_dir, [''], batch_size=1, variant=variant)[0]
  key = cache_key(sd_dir, variant)
  path = cache_dir() / f'{key}.npy'
  if path.is_file():
    width = clip_text_convert.read_config(
        pathlib.Path(sd_dir) / TEXT_ENCODER_SUBFOLDER).width
    try:
      context = np.load(path, allow_pickle=False)
      if (context.dtype == np.float32 and context.ndim == 2 and
          context.shape[1] == width):
        return context
    except (OSError, ValueError):
      pass  # Unreadable: recompute and overwrite below.
  context = encode_prompts(sd_dir, [''], batch_size=1, variant=variant)[0]
  _write_atomically(path, _npy_bytes(context))
  description = {'sd_dir': str(pathlib.Path(sd_dir).resolve()),
                 'variant': variant, 'shape': list(context.shape),
                 'what': "StableDiffusionPipeline.encode_prompt('') context"}
  _write_atomically(path.with_suffix('.json'),
                    json.dumps(description, indent=2).encode())
  return context
