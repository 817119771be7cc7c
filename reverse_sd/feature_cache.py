"""Cached outputs of a frozen backbone, so a head trains without rerunning it.

The paper's CLIP variant freezes the CLIP tower and trains an MLP on its
image embeddings; its white-box variant fine-tunes the SD U-Net on the frozen
VAE's latents. With `config.model.frozen_features=True` the frozen stage (the
whole tower; the VAE) runs once over every split; its outputs are kept as
`{cache_root}/{key}/{split}.npy` ([N, F] features or [N, h, w, 4] latents),
where `key` digests everything that determines them (backbone, variant,
weights files, input size, data set). A rerun or a sweep over the trainable
part's hyperparameters reuses them.
"""

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

from reverse_sd import sharding
from reverse_sd.data import pipeline

CACHE_DIR_NAME = 'reverse_sd_features'


def cache_key(model_config, data_identity: str, input_shape: tuple[int, ...],
              weights_identity: str) -> str:
  """A digest of what the features depend on."""
  description = {
      'backbone': model_config.backbone, 'variant': model_config.variant,
      'projection': bool(model_config.get('vit_projection', False)),
      'dtype': model_config.dtype, 'image_mean': list(model_config.image_mean),
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
    try:
      features = np.load(path, allow_pickle=False, mmap_mode='r')
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'The feature cache {path} is unreadable '
                       f'({type(e).__name__}: {e}). Delete it to recompute.'
                      ) from e
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
