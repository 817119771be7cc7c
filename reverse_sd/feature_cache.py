"""Cached outputs of a frozen backbone, so a head trains without rerunning it.

The paper's CLIP variant freezes the CLIP tower and trains an MLP on its
image embeddings; its white-box variant fine-tunes the SD U-Net on the frozen
VAE's latents. With `config.model.frozen_features=True` the frozen stage (the
whole tower; the VAE) runs once over every split; its outputs are kept as
`{cache_root}/{key}/{split}.npy` ([N, F] features or [N, h, w, 4] latents),
where `key` digests everything that determines them (backbone, variant,
weights files, input size, data set). A rerun or a sweep over the trainable
part's hyperparameters reuses them.

The white-box backbone with `config.model.sd_context='caption'` also reads,
per example, the SD text encoder's context of the example's own prompt
(`pipe.encode_prompt(prompt)`, [77, D]). `attach_caption_contexts` computes
them once per split, independently of the features above, and keeps them as
float16 `{cache_root}/sd_captions/{split}-{key}.npy` [N, 77, D] (with a .json
saying what they were computed from), where `key` digests the text encoder
and tokenizer files (path, size, mtime), the split's name and its prompts in
order (the data identity: the contexts are a function of them alone). Files
are written under a temporary name and renamed when complete, and read back
memory-mapped.
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import numpy as np

from reverse_sd import pretrained
from reverse_sd import sharding
from reverse_sd.convert import clip_text_weights
from reverse_sd.data import datasets
from reverse_sd.data import pipeline
from reverse_sd.models import reverse_model
from reverse_sd.models import whitebox
from reverse_sd.text import sd_context

CACHE_DIR_NAME = 'reverse_sd_features'
# Subfolder of the feature cache with the caption contexts.
CAPTION_CACHE_DIR_NAME = 'sd_captions'
CAPTION_DTYPE = np.float16
# Bump when the caption computation changes, so old files are not reused.
_CAPTION_FORMAT = 1
# Prompts encoded per pass before their contexts go to the file.
_CAPTION_CHUNK = 4096


def _load_cached(path: pathlib.Path, what: str) -> np.ndarray:
  """A cached .npy, memory-mapped, or a clear error naming the file."""
  try:
    return np.load(path, allow_pickle=False, mmap_mode='r')
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'The {what} {path} is unreadable '
                     f'({type(e).__name__}: {e}). Delete it to recompute.'
                    ) from e


def cache_key(model_config, data_identity: str, input_shape: tuple[int, ...],
              weights_identity: str) -> str:
  """A digest of what the features depend on."""
  description = {
      'backbone': model_config.backbone, 'variant': model_config.variant,
      'projection': bool(model_config.get('vit_projection', False)),
      'dtype': str(reverse_model.compute_dtype(model_config)),
      'image_mean': list(model_config.image_mean),
      'image_std': list(model_config.image_std),
      'input_shape': list(input_shape), 'data': data_identity,
      'weights': weights_identity}
  text = json.dumps(description, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_identity(path: str) -> str:
  """Path, size and modification time of the pretrained weights (a file, or
  a folder's *.safetensors)."""
  if not path:
    raise ValueError('config.model.frozen_features=True needs pretrained '
                     'weights (config.model.init_from): the features of a '
                     'random, frozen backbone are not worth caching.')
  root = pathlib.Path(path).resolve()
  files = sorted(root.glob('*.safetensors')) if root.is_dir() else [root]
  parts = [str(root)] + [f'{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}'
                         for f in files if f.exists()]
  return '|'.join(parts)


def make_feature_step(model, mesh: Mesh, params_shardings: Any) -> Callable:
  """Jitted (params, uint8 images) -> frozen-stage outputs, sharded by
  batch."""
  batch_sharding = sharding.batch_sharding(mesh)

  def features(params, images):
    return model.apply({'params': params}, images,
                       method=type(model).extract_features)

  return jax.jit(features, in_shardings=(params_shardings, batch_sharding),
                 out_shardings=batch_sharding)


def compute_features(feature_step: Callable, params: Any,
                     split: pipeline.SplitData, *, mesh: Mesh,
                     global_batch_size: int) -> np.ndarray:
  """float32 [N, ...] frozen-stage outputs of a split, in data-source order."""
  split = dataclasses.replace(split, context=None)  # Only images are read.
  out = None
  for batch in pipeline.eval_batches(
      split, global_batch_size=global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count()):
    images = sharding.host_to_global({'image': batch['image']}, mesh)['image']
    index = sharding.host_to_global({'index': batch['index']}, mesh)['index']
    values = multihost_utils.process_allgather(
        feature_step(params, images), tiled=True)
    index = multihost_utils.process_allgather(index, tiled=True)
    if out is None:
      out = np.zeros((len(split), *values.shape[1:]), np.float32)
    valid = index >= 0
    out[index[valid]] = values[valid]
  return out


def load_or_compute(cache_dir: pathlib.Path, split: pipeline.SplitData,
                    compute: Callable[[], np.ndarray]) -> np.ndarray:
  """The split's cached features, computing and saving them once.

  A cache is memory-mapped: latents of a large split need not fit in RAM.
  """
  path = cache_dir / f'{split.name}.npy'
  if path.exists():
    features = _load_cached(path, 'feature cache')
    if features.ndim < 2 or len(features) != len(split):
      raise ValueError(f'The feature cache {path} has shape {features.shape} '
                       f'but split {split.name!r} has {len(split)} examples. '
                       'Delete it to recompute.')
    return features
  start = time.time()
  features = compute()
  if jax.process_index() == 0:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f'{split.name}.tmp-{os.getpid()}.npy'
    np.save(tmp, features)
    os.replace(tmp, path)
  logging.info('Cached %s features of %d %s examples in %.1f s at %s',
               features.shape[1:], len(split), split.name,
               time.time() - start, path)
  return features


# --- Per-example caption contexts (sd_context='caption') ---------------------


def prompts_digest(prompts) -> str:
  """Hex digest of a sequence of prompts, in order."""
  digest = hashlib.sha256()
  for prompt in prompts:
    data = str(prompt).encode('utf-8')
    digest.update(len(data).to_bytes(8, 'little'))
    digest.update(data)
  return digest.hexdigest()


def caption_cache_key(encoder_dir: str | os.PathLike[str],
                      split: pipeline.SplitData) -> str:
  """A digest of what a split's caption contexts depend on: the text encoder
  and tokenizer files (path, size, mtime), the split's name and prompts."""
  description = {'format': _CAPTION_FORMAT,
                 'text_encoder': sd_context.cache_key(encoder_dir),
                 'split': split.name, 'num_examples': len(split),
                 'prompts': prompts_digest(split.table.prompts)}
  text = json.dumps(description, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def caption_cache_root() -> pathlib.Path:
  """Where `evaluate.predict_split` keeps the caption contexts of splits that
  came without them (no data config at hand): `$REVERSE_SD_CACHE_DIR/
  sd_context/captions`, else ~/.cache/reverse_sd/sd_context/captions."""
  return sd_context.cache_dir() / 'captions'


def _read_contexts(path: pathlib.Path, split: pipeline.SplitData,
                   width: int | None) -> np.ndarray:
  """The [N, T, width] float16 contexts at `path` (any width if None)."""
  if not path.exists():
    raise FileNotFoundError(f'{path}: no caption contexts for split '
                            f'{split.name!r}.')
  contexts = _load_cached(path, 'caption context cache')
  if (contexts.dtype != CAPTION_DTYPE or contexts.ndim != 3 or
      len(contexts) != len(split) or
      (width is not None and contexts.shape[2] != width)):
    raise ValueError(
        f'The caption context cache {path} holds {contexts.dtype} '
        f'{contexts.shape}; split {split.name!r} needs float16 '
        f'[{len(split)}, T, {width}]. Delete it to recompute.')
  return contexts


def _encode_to_file(encoder, prompts, path: pathlib.Path,
                    batch_size: int) -> None:
  """Writes the float16 contexts of `prompts` to the .npy `path`, a chunk at
  a time (a large split's contexts need not fit in RAM)."""
  shape = (len(prompts), encoder.tokenizer.max_length, encoder.config.width)
  out = np.lib.format.open_memmap(path, mode='w+', dtype=CAPTION_DTYPE,
                                  shape=shape)
  for start in range(0, len(prompts), _CAPTION_CHUNK):
    chunk = [str(p) for p in prompts[start:start + _CAPTION_CHUNK]]
    out[start:start + len(chunk)] = encoder.encode(chunk,
                                                   batch_size=batch_size)
  out.flush()
  del out  # Closes the memory map.


def caption_contexts(encoder_dir: str | os.PathLike[str],
                     split: pipeline.SplitData, cache_root: pathlib.Path, *,
                     batch_size: int = 64) -> np.ndarray:
  """The split's caption contexts, float16 [N, 77, D], memory-mapped.

  Row i is `sd_context.encode_prompts(encoder_dir, [prompt_i])[0]` in
  float16. Computed once and cached under `cache_root` (see the module
  docstring); later calls read the file. Every process computes them; the
  first one publishes the file.

  Raises:
    FileNotFoundError: `encoder_dir` has no text_encoder/ or tokenizer/.
    ValueError: the cached file is unreadable or has the wrong shape (the
      message names it).
  """
  encoder_dir = pathlib.Path(encoder_dir)
  key = caption_cache_key(encoder_dir, split)
  path = cache_root / f'{split.name}-{key}.npy'
  if path.exists():
    width = clip_text_weights.read_config(
        encoder_dir / sd_context.TEXT_ENCODER_SUBFOLDER).width
    return _read_contexts(path, split, width)
  start = time.time()
  encoder = sd_context.SDTextEncoder(encoder_dir)
  cache_root.mkdir(parents=True, exist_ok=True)
  # A killed run leaves only this temporary file, which is never read.
  tmp = cache_root / (f'{path.stem}.tmp-{jax.process_index()}-'
                      f'{os.getpid()}.npy')
  try:
    _encode_to_file(encoder, split.table.prompts, tmp, batch_size)
    if jax.process_index() == 0:
      description = {'sd_dir': str(encoder_dir.resolve()),
                     'split': split.name, 'num_examples': len(split),
                     'what': 'StableDiffusionPipeline.encode_prompt(prompt) '
                             'of each example, float16'}
      info = path.with_suffix('.json')
      info_tmp = info.with_name(f'{info.name}.tmp-{os.getpid()}')
      info_tmp.write_text(json.dumps(description, indent=2) + '\n')
      os.replace(info_tmp, info)
      os.replace(tmp, path)
      contexts = _read_contexts(path, split, encoder.config.width)
    else:
      # Its own copy: the cache may not be on storage all processes share.
      # The map stays valid when the file is unlinked below.
      contexts = _read_contexts(tmp, split, encoder.config.width)
  finally:
    tmp.unlink(missing_ok=True)
  logging.info('Cached the caption contexts %s of %d %s prompts in %.1f s '
               'at %s', contexts.shape[1:], len(split), split.name,
               time.time() - start, path)
  return contexts


def attach_caption_contexts(config, splits: dict[str, pipeline.SplitData]
                            ) -> dict[str, pipeline.SplitData]:
  """With `config.model.sd_context='caption'` (white-box backbone): every
  split with its caption contexts (`caption_contexts`, cached in the feature
  cache beside the data); otherwise `splits` as they are."""
  model_config = config.model
  if (model_config.backbone != reverse_model.WHITEBOX or
      model_config.get('sd_context', 'empty') != whitebox.CAPTION):
    return splits
  given = model_config.get('sd_caption_contexts', '')
  if given:
    # Contexts made elsewhere (e.g. the miniature loop's captions from a
    # black-box model's predicted words): one float16 [N, T, D] per split.
    return {name: dataclasses.replace(split, context=_read_contexts(
        pathlib.Path(given) / f'{name}.npy', split, None))
            for name, split in splits.items()}
  encoder_dir = pretrained.check_caption_encoder(model_config)
  cache_root = (datasets.resolve_data_dir(config.data) / CACHE_DIR_NAME /
                CAPTION_CACHE_DIR_NAME)
  return {name: dataclasses.replace(split, context=caption_contexts(
      encoder_dir, split, cache_root, batch_size=config.text.batch_size))
          for name, split in splits.items()}
