"""Mapping table: Hugging Face CLIP vision towers -> `vit.VisionTransformer`.

Source layouts (all `save_pretrained(..., safe_serialization=True)`):

* transformers 5 `CLIPVisionModel`: the tower's keys at the top level,
  `embeddings.*`, `pre_layrnorm.*`, `encoder.layers.{i}.*`,
  `post_layernorm.*` (no projection).
* transformers 4 `CLIPVisionModel`: the same under `vision_model.`.
* `CLIPVisionModelWithProjection` (4 and 5): `vision_model.*` and
  `visual_projection.weight`.
* `CLIPModel` (4 and 5): `vision_model.*`, `visual_projection.weight`, and
  the text half (`text_model.*`, `text_projection.weight`, `logit_scale`),
  which is ignored explicitly.

Any of these may sit under a root prefix such as `model.` (ROOT_PREFIXES).
Every other key is reported as unused; nothing is dropped silently.

Target paths are those of `VisionTransformer`'s 'params' collection. When the
target image size differs from the checkpoint's, the position embeddings are
resized like Hugging Face's `CLIPVisionEmbeddings.interpolate_pos_encoding`
(`resize_position_embedding`).

Checkpoints are read as safetensors only; pickled `pytorch_model.bin` files
are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reverse_sd.convert import core
from reverse_sd.models import vit

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
WEIGHTS_INDEX_FILE = 'model.safetensors.index.json'
# Weight files that would need unpickling (or another framework) to read.
_UNSUPPORTED_WEIGHTS = ('pytorch_model.bin', 'pytorch_model.bin.index.json',
                        'tf_model.h5', 'flax_model.msgpack')

# Prefixes of the whole checkpoint (a CLIP model nested in a larger one).
ROOT_PREFIXES = ('', 'model.', 'clip.')
# Prefix of the tower inside the root: transformers 5 `CLIPVisionModel` saves
# the tower bare, every other class under `vision_model.`.
TOWER_PREFIXES = ('vision_model.', '')
_ANCHOR = 'embeddings.patch_embedding.weight'
PROJECTION_KEY = 'visual_projection.weight'

# Source keys (relative to the root prefix) that are deliberately unused: the
# text half of a full CLIPModel and the non-persistent position_ids buffers
# that older checkpoints contain.
IGNORED = (
    r'text_model\..*',
    r'text_projection\.weight',
    r'logit_scale',
    r'(vision_model\.)?embeddings\.position_ids',
)

# Hugging Face CLIP `hidden_act` -> `ViTConfig.activation`.
_ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu'}
_CLIP_MODEL_TYPES = ('clip', 'clip_vision_model')
# Keys a CLIP vision config must spell out; the rest take Hugging Face's
# CLIPVisionConfig defaults, as transformers does.
_REQUIRED_KEYS = ('hidden_size', 'intermediate_size', 'num_hidden_layers',
                  'num_attention_heads', 'patch_size')
_DEFAULTS = {'image_size': 224, 'hidden_act': 'quick_gelu',
             'layer_norm_eps': 1e-5, 'projection_dim': 512, 'num_channels': 3}


# --- config.json --------------------------------------------------------------


def find_tower_config(config_json: Any, tower: str, *,
                      model_types: Sequence[str],
                      required_keys: Sequence[str], source_name: str
                      ) -> tuple[Mapping[str, Any], str, Any, list[str]]:
  """Finds one tower's config in a Hugging Face CLIP `config.json`.

  A full `CLIPModel` config has it under `{tower}_config`; a tower-only one
  (e.g. `CLIPVisionModel`, `CLIPTextModel`) at the top level.

  Args:
    config_json: the parsed config.json.
    tower: 'vision' or 'text'.
    model_types: the accepted `model_type`s (the tower's, else the top
      level's; a config without one is accepted).
    required_keys: keys the tower's config must spell out.
    source_name: file name for error messages.

  Returns:
    (tower config, where it is: '{tower}_config' or 'the top level',
    model_type or None, the missing `required_keys`).

  Raises:
    ValueError: the JSON or the tower config is not an object, or model_type
      is not one of `model_types` (names the missing keys too).
  """
  if not isinstance(config_json, Mapping):
    raise ValueError(f'{source_name}: expected a JSON object, got '
                     f'{type(config_json).__name__}.')
  key = f'{tower}_config'
  config = config_json.get(key, config_json)
  if not isinstance(config, Mapping):
    raise ValueError(f'{source_name}: {key} is {type(config).__name__}, '
                     'expected a JSON object.')
  where = key if config is not config_json else 'the top level'
  model_type = config.get('model_type', config_json.get('model_type'))
  missing = [k for k in required_keys if k not in config]
  if model_type is not None and model_type not in model_types:
    raise ValueError(
        f'{source_name}: model_type {model_type!r} is not a CLIP {tower} model '
        f'(expected one of {list(model_types)})' +
        (f'; missing keys {missing} at {where}' if missing else '') + '.')
  return config, where, model_type, missing


def vit_config_from_hf(config_json: Mapping[str, Any], *,
                       source_name: str = CONFIG_FILE) -> vit.ViTConfig:
  """Reads the vision tower's shape from a Hugging Face CLIP `config.json`.

  Accepts a full `CLIPModel` config (the tower under `vision_config`, the
  projection size at the top level) or a vision-only one
  (`CLIPVisionModel`, `CLIPVisionModelWithProjection`). Missing optional keys
  (`image_size`, `hidden_act`, `layer_norm_eps`, `projection_dim`) take
  transformers' `CLIPVisionConfig` defaults.

  Args:
    config_json: the parsed config.json.
    source_name: file name for error messages.

  Returns:
    The `ViTConfig`; its `image_size` is the checkpoint's.

  Raises:
    ValueError: not a CLIP config (names the file, `model_type` and the
      missing keys), or an unsupported activation / channel count.
  """
  vision, where, model_type, missing = find_tower_config(
      config_json, 'vision', model_types=_CLIP_MODEL_TYPES,
      required_keys=_REQUIRED_KEYS, source_name=source_name)
  if missing:
    raise ValueError(
        f'{source_name}: not a CLIP vision config: missing keys {missing} at '
        f'{where} (model_type {model_type!r}).')

  def get(key: str) -> Any:
    return vision.get(key, _DEFAULTS.get(key))

  hidden_act = get('hidden_act')
  if hidden_act not in _ACTIVATIONS:
    raise ValueError(f'{source_name}: hidden_act {hidden_act!r} is not '
                     f'supported; expected one of {sorted(_ACTIVATIONS)}.')
  if get('num_channels') != 3:
    raise ValueError(f'{source_name}: num_channels {get("num_channels")!r}; '
                     'only RGB (3) towers are supported.')
  # A full CLIPModel's projection size is its top-level `projection_dim`
  # (CLIPModel builds visual_projection from it); a vision-only config has it
  # at the top level too.
  projection_dim = config_json.get('projection_dim', get('projection_dim'))
  fields = dict(
      patch_size=vision['patch_size'],
      width=vision['hidden_size'],
      layers=vision['num_hidden_layers'],
      heads=vision['num_attention_heads'],
      mlp_dim=vision['intermediate_size'],
      image_size=get('image_size'),
      projection_dim=projection_dim,
  )
  for key, value in fields.items():
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'{source_name}: {key} (ViTConfig field) is {value!r}; '
                       'expected a positive integer.')
  if fields['width'] % fields['heads']:
    raise ValueError(f'{source_name}: hidden_size {fields["width"]} is not '
                     f'divisible by num_attention_heads {fields["heads"]}.')
  return vit.ViTConfig(activation=_ACTIVATIONS[hidden_act],
                       layer_norm_eps=float(get('layer_norm_eps')), **fields)


# --- Position embeddings ------------------------------------------------------


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic convolution weights for taps at -1, 0, 1, 2 (A=-0.75)."""

  def near(x):  # |x| <= 1.
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2.
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] matrix of `torch.nn.functional.interpolate` bicubic.

  Matches mode='bicubic', align_corners=False, antialias=False with an output
  `size` (not a scale factor): source coordinate (dst + 0.5) * in/out - 0.5,
  not clamped; four taps with A=-0.75; tap indices clamped to the border.
  """
  scale = size_in / size_out
  real = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
  start = np.floor(real)
  weights = _cubic_weights(real - start)
  matrix = np.zeros((size_out, size_in), np.float64)
  for tap in range(4):
    index = np.clip(start.astype(np.int64) - 1 + tap, 0, size_in - 1)
    np.add.at(matrix, (np.arange(size_out), index), weights[:, tap])
  return matrix


def resize_position_embedding(pos_embed_TxD: np.ndarray,
                              grid: tuple[int, int]) -> np.ndarray:
  """Resizes CLIP position embeddings to a new patch grid.

  Like Hugging Face's `CLIPVisionEmbeddings.interpolate_pos_encoding`: the
  class token row is kept; the patch rows, a square [g, g, D] grid in
  row-major order, are resized per channel with PyTorch's bicubic filter
  (align_corners=False, no antialiasing, also when shrinking). Computed in
  float64 numpy and cast back to the input dtype.

  Args:
    pos_embed_TxD: [1 + g*g, D] position embeddings.
    grid: the new (rows, cols) of patches.

  Returns:
    [1 + rows*cols, D] position embeddings.

  Raises:
    ValueError: the input is not [1 + g*g, D].
  """
  if pos_embed_TxD.ndim != 2:
    raise ValueError(f'position embeddings must be [T, D], got shape '
                     f'{tuple(pos_embed_TxD.shape)}')
  size = math.isqrt(pos_embed_TxD.shape[0] - 1)
  if size * size + 1 != pos_embed_TxD.shape[0]:
    raise ValueError(f'{pos_embed_TxD.shape[0]} position embeddings are not a '
                     'class token plus a square grid of patches')
  rows, cols = grid
  if (rows, cols) == (size, size):
    return pos_embed_TxD
  patches = pos_embed_TxD[1:].astype(np.float64).reshape(size, size, -1)
  resized = np.einsum('oh,hwd,pw->opd', bicubic_matrix(size, rows), patches,
                      bicubic_matrix(size, cols))
  resized = resized.reshape(rows * cols, -1).astype(pos_embed_TxD.dtype)
  return np.concatenate([pos_embed_TxD[:1], resized], axis=0)


def _resize_to(grid: tuple[int, int],
               source_grid: int | None) -> core.Transform:
  """A transform resizing position embeddings from `source_grid` to `grid`."""

  def _resize(pos_embed_TxD: np.ndarray) -> np.ndarray:
    if (source_grid is not None and
        pos_embed_TxD.shape[0] != source_grid * source_grid + 1):
      raise ValueError(
          f'the config.json image size gives a {source_grid}x{source_grid} '
          f'patch grid, i.e. {source_grid * source_grid + 1} position '
          f'embeddings')
    return resize_position_embedding(pos_embed_TxD, grid)

  _resize.__name__ = f'resize_position_embedding(grid={grid})'
  return _resize


# --- Mapping table ------------------------------------------------------------


_layer_norm = core.layer_norm_rules
_dense = core.dense_rules


def encoder_layer_rules(source: str, target: str) -> list[core.Rule]:
  """The rules of one Hugging Face CLIP encoder layer (vision or text tower).

  Args:
    source: the layer's key prefix, e.g. 'vision_model.encoder.layers.0'.
    target: the layer's param path, e.g. 'layers_0'.

  Returns:
    The rules for self_attn q/k/v/out_proj, layer_norm1/2 and mlp fc1/fc2.
  """
  return [
      *_dense(f'{source}.self_attn.q_proj', f'{target}/self_attn/q_proj'),
      *_dense(f'{source}.self_attn.k_proj', f'{target}/self_attn/k_proj'),
      *_dense(f'{source}.self_attn.v_proj', f'{target}/self_attn/v_proj'),
      *_dense(f'{source}.self_attn.out_proj', f'{target}/self_attn/out_proj'),
      *_layer_norm(f'{source}.layer_norm1', f'{target}/layer_norm1'),
      *_layer_norm(f'{source}.layer_norm2', f'{target}/layer_norm2'),
      *_dense(f'{source}.mlp.fc1', f'{target}/fc1'),
      *_dense(f'{source}.mlp.fc2', f'{target}/fc2'),
  ]


def clip_vision_rules(num_layers: int, with_projection: bool, *,
                      tower_prefix: str = 'vision_model.',
                      position_transform: core.Transform = core.identity
                      ) -> list[core.Rule]:
  """The full table for a CLIP vision tower with `num_layers` blocks.

  Args:
    num_layers: transformer blocks of the target model.
    with_projection: also map `visual_projection.weight` (at the root, not
      under `tower_prefix`).
    tower_prefix: prefix of the tower's keys: 'vision_model.' or '' (the
      transformers 5 `CLIPVisionModel` layout).
    position_transform: applied to the position embeddings (identity, or a
      resize to another patch grid).

  Returns:
    The rules; sources are relative to the checkpoint's root prefix.
  """
  t = tower_prefix
  rules = [
      core.Rule(f'{t}embeddings.patch_embedding.weight',
                'patch_embedding/kernel', core.conv_kernel),
      core.Rule(f'{t}embeddings.class_embedding', 'class_embedding'),
      core.Rule(f'{t}embeddings.position_embedding.weight',
                'position_embedding', position_transform),
      *_layer_norm(f'{t}pre_layrnorm', 'pre_layrnorm'),
  ]
  for i in range(num_layers):
    rules += encoder_layer_rules(f'{t}encoder.layers.{i}', f'layers_{i}')
  rules += _layer_norm(f'{t}post_layernorm', 'post_layernorm')
  if with_projection:
    rules.append(core.Rule(PROJECTION_KEY, 'visual_projection/kernel',
                           core.transpose))
  return rules


def detect_prefixes(keys: Sequence[str], *,
                    source_name: str = '<checkpoint>') -> tuple[str, str]:
  """Returns (root prefix, tower prefix) of a CLIP vision checkpoint.

  Raises:
    core.ConversionError: no known layout matches (names the first keys).
  """
  candidates = [root + tower for root in ROOT_PREFIXES
                for tower in TOWER_PREFIXES]
  found = core.detect_prefix(keys, _ANCHOR, candidates,
                             source_name=source_name)
  for root in ROOT_PREFIXES:
    for tower in TOWER_PREFIXES:
      if root + tower == found:
        return root, tower
  raise AssertionError(found)  # Unreachable: `found` is one of `candidates`.


def checkpoint_tower(tensors: Mapping[str, np.ndarray], prefix: str,
                     anchor: str) -> tuple[str, tuple[int, ...], int]:
  """Returns (anchor key, its shape, number of encoder layers) of a tower.

  Args:
    tensors: the flat checkpoint.
    prefix: the tower's key prefix (root and tower prefix).
    anchor: the tower's anchor key relative to `prefix`; must be present.
  """
  key = prefix + anchor
  layer_prefix = prefix + 'encoder.layers.'
  num_layers = len({k[len(layer_prefix):].split('.')[0] for k in tensors
                    if k.startswith(layer_prefix)})
  return key, tuple(tensors[key].shape), num_layers


def _tower_mismatch(tensors: Mapping[str, np.ndarray], prefix: str,
                    abstract_params: Mapping[str, Any],
                    num_layers: int) -> str | None:
  """Says how the checkpoint's tower differs from the target, if it does.

  Compares width, patch size and depth of the checkpoint (from its patch
  embedding and layer keys) with the target, to head the per-key list of a
  checkpoint of another variant with one summary line.
  """
  key, source_shape, source_layers = checkpoint_tower(tensors, prefix,
                                                      _ANCHOR)
  try:
    target_shape = tuple(abstract_params['patch_embedding']['kernel'].shape)
  except (KeyError, TypeError, AttributeError):
    return None
  if len(source_shape) != 4 or len(target_shape) != 4:
    return None
  expected = (target_shape[3], target_shape[2], *target_shape[:2])
  if source_shape == expected and source_layers == num_layers:
    return None
  return (f'the checkpoint is a CLIP vision tower of width {source_shape[0]}, '
          f'patch {source_shape[2]} and {source_layers} layers (key {key!r} '
          f'has shape {source_shape}); the target ViT has width {expected[0]}, '
          f'patch {expected[2]} and {num_layers} layers (expected shape '
          f'{expected}). Pick the variant that matches the checkpoint, or '
          'read it from its config.json (`vit_config_from_hf`).')


def convert_clip_vision(tensors: Mapping[str, np.ndarray],
                        abstract_params: Mapping[str, Any], *, num_layers: int,
                        source_name: str = '<checkpoint>',
                        image_size: int | tuple[int, int] | None = None,
                        source_image_size: int | None = None
                        ) -> dict[str, Any]:
  """Converts a Hugging Face CLIP (vision) state dict into ViT params.

  The projection is converted when `abstract_params` has
  'visual_projection' (a `VisionTransformer` with `use_projection=True`);
  otherwise a checkpoint's `visual_projection.weight` is ignored.

  Args:
    tensors: flat {key: array}, e.g. from `core.load_safetensors`.
    abstract_params: the 'params' collection of `VisionTransformer`, abstract
      (from `jax.eval_shape`) or concrete, built at the target image size.
    num_layers: transformer blocks of the target model.
    source_name: file name for error messages.
    image_size: the target image size (int or (height, width)); when given,
      the position embeddings are resized to its patch grid (a no-op at the
      checkpoint's own size). When None they are copied and must fit as is.
    source_image_size: the checkpoint's `image_size` from config.json; when
      given, the checkpoint's position embeddings must match it.

  Returns:
    The nested param dict (numpy arrays) for `VisionTransformer`.

  Raises:
    core.ConversionError: a key is missing or unused, or a tensor does not
      have the shape the target needs (names the key and both shapes).
  """
  root, tower = detect_prefixes(list(tensors), source_name=source_name)
  with_projection = 'visual_projection' in abstract_params
  ignore = list(IGNORED)
  if not with_projection:
    ignore.append(r'visual_projection\.weight')
  position_transform = core.identity
  if image_size is not None:
    try:
      patch_size = abstract_params['patch_embedding']['kernel'].shape[0]
    except (KeyError, TypeError) as e:
      raise ValueError('abstract_params has no patch_embedding/kernel: not '
                       'the params of a VisionTransformer') from e
    height, width = ((image_size, image_size) if isinstance(image_size, int)
                     else image_size)
    source_grid = (None if source_image_size is None
                   else source_image_size // patch_size)
    position_transform = _resize_to(
        (height // patch_size, width // patch_size), source_grid)
  rules = clip_vision_rules(num_layers, with_projection, tower_prefix=tower,
                            position_transform=position_transform)
  try:
    return core.convert(tensors, rules, abstract_params, ignore=ignore,
                        prefix=root, source_name=source_name)
  except core.ConversionError as e:
    mismatch = _tower_mismatch(tensors, root + tower, abstract_params,
                               num_layers)
    if mismatch is None:
      raise
    details = str(e).removeprefix(f'{source_name}: ')
    raise core.ConversionError(
        f'{source_name}: {mismatch}\n{details}') from None


# --- Model folders ------------------------------------------------------------


def load_weights(model_dir: str | os.PathLike[str]
                 ) -> tuple[dict[str, np.ndarray], str]:
  """Reads `model.safetensors` (or its sharded index) from a model folder.

  Returns:
    (flat tensors, the file name to use in error messages).

  Raises:
    FileNotFoundError: no safetensors weights (says how to convert pickled
      `pytorch_model.bin` weights).
    core.ConversionError: an unreadable file or a bad shard index.
  """
  model_dir = pathlib.Path(model_dir)
  single = model_dir / WEIGHTS_FILE
  if single.is_file():
    return core.load_safetensors(single), str(single)
  index_path = model_dir / WEIGHTS_INDEX_FILE
  if index_path.is_file():
    return _load_sharded(index_path), str(index_path)
  found = [name for name in _UNSUPPORTED_WEIGHTS
           if (model_dir / name).is_file()]
  if found:
    raise FileNotFoundError(
        f'{model_dir}: has {found} but no {WEIGHTS_FILE}. Pickled / other '
        'framework weights are never loaded here (unpickling runs code). '
        'Convert them to safetensors once, in a separate trusted environment '
        'with transformers, e.g. `CLIPModel.from_pretrained(dir)'
        '.save_pretrained(out_dir, safe_serialization=True)`.')
  raise FileNotFoundError(
      f'{model_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} found.')


def _load_sharded(index_path: pathlib.Path) -> dict[str, np.ndarray]:
  """Loads the shards named by a `model.safetensors.index.json`."""
  try:
    weight_map = json.loads(index_path.read_text())['weight_map']
    shards = sorted(set(weight_map.values()))
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise core.ConversionError(
        f'{index_path}: not a safetensors index with a "weight_map" '
        f'({e!r})') from e
  tensors: dict[str, np.ndarray] = {}
  for shard in shards:
    shard_path = index_path.parent / shard
    if pathlib.Path(shard).name != shard:
      raise core.ConversionError(
          f'{index_path}: shard name {shard!r} is not a plain file name')
    for key, value in core.load_safetensors(shard_path).items():
      if key in tensors:
        raise core.ConversionError(
            f'{shard_path}: key {key!r} is also in another shard')
      if weight_map.get(key) != shard:
        raise core.ConversionError(
            f'{shard_path}: key {key!r} is listed in {index_path.name} under '
            f'{weight_map.get(key)!r}, not {shard!r}')
      tensors[key] = value
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise core.ConversionError(
        f'{index_path}: {len(missing)} key(s) of the weight_map are in no '
        f'shard, e.g. {missing[:5]}')
  return tensors


def read_config(model_dir: str | os.PathLike[str]) -> vit.ViTConfig:
  """`vit_config_from_hf` of a model folder's config.json."""
  path = pathlib.Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path}: not found (a Hugging Face model folder '
                            'has config.json next to the weights).')
  try:
    config_json = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  return vit_config_from_hf(config_json, source_name=str(path))


def load_clip_vision(model_dir: str | os.PathLike[str], *,
                     image_size: int | None = None,
                     with_projection: bool = False
                     ) -> tuple[vit.ViTConfig, dict[str, Any]]:
  """Loads a Hugging Face CLIP vision tower from a local model folder.

  Reads `config.json` and `model.safetensors` (or a sharded
  `model.safetensors.index.json`); never unpickles.

  Args:
    model_dir: folder written by `save_pretrained` of `CLIPModel`,
      `CLIPVisionModel` or `CLIPVisionModelWithProjection`.
    image_size: target image size; defaults to the checkpoint's. Position
      embeddings are resized bicubically when it differs.
    with_projection: also load `visual_projection` (the checkpoint must have
      it) for `VisionTransformer(config, use_projection=True)`.

  Returns:
    (config, params): `config.image_size` is the target image size, and
    `VisionTransformer(config, use_projection=with_projection).apply(
    {'params': params}, images_BxHxWx3)` runs the tower (numpy params).

  Raises:
    FileNotFoundError: a missing folder, config.json or safetensors weights.
    ValueError: config.json is not a CLIP config.
    core.ConversionError: the weights do not fit the config (names the key
      and both shapes).
  """
  model_dir = pathlib.Path(model_dir)
  if not model_dir.is_dir():
    raise FileNotFoundError(f'CLIP model folder not found: {model_dir}')
  config = read_config(model_dir)
  tensors, source_name = load_weights(model_dir)
  source_image_size = config.image_size
  if image_size is not None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
      raise TypeError(f'image_size must be an int, got {image_size!r}')
    if image_size < config.patch_size:
      raise ValueError(f'image_size {image_size} is smaller than the patch '
                       f'size {config.patch_size} of {model_dir}')
    config = dataclasses.replace(config, image_size=image_size)
  model = vit.VisionTransformer(config, use_projection=with_projection)
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), dummy)['params']
  params = convert_clip_vision(
      tensors, abstract, num_layers=config.layers, source_name=source_name,
      image_size=config.image_size, source_image_size=source_image_size)
  return config, params
