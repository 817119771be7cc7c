"""Mapping table: Hugging Face CLIP text towers -> `ClipTextTransformer`.

Source layouts (`model.safetensors` of a `text_encoder/` folder, or of a CLIP
model folder):

* transformers 5 `CLIPTextModel.save_pretrained`: the tower's keys at the
  top level: `embeddings.token_embedding.weight`,
  `embeddings.position_embedding.weight`, `encoder.layers.{i}.*`,
  `final_layer_norm.*`.
* transformers 4 `CLIPTextModel` (every SD 1.x / 2.x text_encoder/ on the
  Hub), `CLIPTextModelWithProjection` and `CLIPModel` (4 and 5): the same
  under `text_model.`. Older files also hold the int64
  `text_model.embeddings.position_ids` buffer, which is ignored; so are a
  `text_projection.weight` and, in a full `CLIPModel`, the vision half
  (`vision_model.*`, `visual_projection.weight`, `logit_scale`).

Every other key is reported as unused; nothing is dropped silently. Weights
may be float16 or bfloat16 (read as float32 params). Checkpoints are read as
safetensors only; pickled `pytorch_model.bin` files are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reverse_sd.convert import clip as clip_convert
from reverse_sd.convert import core
from reverse_sd.models import clip_text

CONFIG_FILE = 'config.json'
WEIGHTS_NAME = 'model'

# Prefix of the tower: transformers 5 `CLIPTextModel` saves it bare, every
# other class (and transformers 4) under `text_model.`.
TOWER_PREFIXES = ('text_model.', '')
_ANCHOR = 'embeddings.token_embedding.weight'

# Source keys that are deliberately unused (full match).
IGNORED = (
    r'(text_model\.)?embeddings\.position_ids',
    r'text_projection\.weight',
    r'vision_model\..*',
    r'visual_projection\.weight',
    r'logit_scale',
)

_CLIP_MODEL_TYPES = ('clip', 'clip_text_model')
# Keys a CLIP text config must spell out; the rest take transformers'
# CLIPTextConfig defaults, as transformers does.
_REQUIRED_KEYS = ('hidden_size', 'intermediate_size', 'num_hidden_layers',
                  'num_attention_heads')
_DEFAULTS = {'vocab_size': 49408, 'max_position_embeddings': 77,
             'hidden_act': 'quick_gelu', 'layer_norm_eps': 1e-5,
             'bos_token_id': 49406, 'eos_token_id': 49407, 'pad_token_id': 1}


# --- config.json --------------------------------------------------------------


def text_config_from_hf(config_json: Mapping[str, Any], *,
                        source_name: str = CONFIG_FILE
                        ) -> clip_text.ClipTextConfig:
  """Reads the text tower's shape from a Hugging Face CLIP `config.json`.

  Accepts a `CLIPTextModel` / `CLIPTextModelWithProjection` config (what a
  Stable Diffusion text_encoder/ has) or a full `CLIPModel` one (the tower
  under `text_config`). Missing optional keys take transformers'
  `CLIPTextConfig` defaults.

  Raises:
    ValueError: not a CLIP text config (names the file, `model_type` and the
      missing keys), or an unsupported activation.
  """
  text, where, _, missing = clip_convert.find_tower_config(
      config_json, 'text', model_types=_CLIP_MODEL_TYPES,
      required_keys=_REQUIRED_KEYS, source_name=source_name)
  if missing:
    raise ValueError(f'{source_name}: missing keys {missing} at {where}; is '
                     'this the config.json of a CLIP text encoder?')
  get = lambda key: text.get(key, _DEFAULTS.get(key))
  try:
    return clip_text.ClipTextConfig(
        vocab_size=int(get('vocab_size')),
        width=int(text['hidden_size']),
        layers=int(text['num_hidden_layers']),
        heads=int(text['num_attention_heads']),
        mlp_dim=int(text['intermediate_size']),
        max_positions=int(get('max_position_embeddings')),
        activation=get('hidden_act'),
        layer_norm_eps=float(get('layer_norm_eps')),
        bos_token_id=int(get('bos_token_id')),
        eos_token_id=int(get('eos_token_id')),
        pad_token_id=int(get('pad_token_id')))
  except (TypeError, ValueError) as e:
    raise ValueError(f'{source_name}: {e}') from e


def read_config(model_dir: str | os.PathLike[str]
                ) -> clip_text.ClipTextConfig:
  """`text_config_from_hf` of a model folder's config.json."""
  path = pathlib.Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path}: not found (a text_encoder/ folder has '
                            'config.json next to model.safetensors).')
  try:
    config_json = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  return text_config_from_hf(config_json, source_name=str(path))


# --- Mapping table ------------------------------------------------------------


_layer_norm = core.layer_norm_rules


def clip_text_rules(num_layers: int, *, tower_prefix: str = 'text_model.'
                    ) -> list[core.Rule]:
  """The full table for a CLIP text tower with `num_layers` blocks.

  Args:
    num_layers: transformer blocks of the target model.
    tower_prefix: 'text_model.' or '' (transformers 5 `CLIPTextModel`).
  """
  t = tower_prefix
  rules = [
      core.Rule(f'{t}embeddings.token_embedding.weight',
                'token_embedding/embedding'),
      core.Rule(f'{t}embeddings.position_embedding.weight',
                'position_embedding'),
  ]
  for i in range(num_layers):
    rules += clip_convert.encoder_layer_rules(f'{t}encoder.layers.{i}',
                                              f'layers_{i}')
  rules += _layer_norm(f'{t}final_layer_norm', 'final_layer_norm')
  return rules


def abstract_params(config: clip_text.ClipTextConfig) -> dict[str, Any]:
  """The 'params' shapes of `ClipTextTransformer(config)` (no arrays)."""
  model = clip_text.ClipTextTransformer(config)
  ids = jnp.zeros((1, config.max_positions), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), ids)['params']


def _tower_mismatch(tensors: Mapping[str, np.ndarray], prefix: str,
                    abstract: Mapping[str, Any],
                    num_layers: int) -> str | None:
  """One summary line when the checkpoint is another size of tower."""
  key, source_shape, source_layers = clip_convert.checkpoint_tower(
      tensors, prefix, _ANCHOR)
  try:
    target_shape = tuple(abstract['token_embedding']['embedding'].shape)
  except (KeyError, TypeError, AttributeError):
    return None
  if source_shape == target_shape and source_layers == num_layers:
    return None
  return (f'the checkpoint is a CLIP text tower with vocabulary x width '
          f'{source_shape} and {source_layers} layers (key {key!r}); the '
          f'target has {target_shape} and {num_layers} layers. Read the '
          'config from the same folder as the weights (`read_config`).')


def convert_clip_text(tensors: Mapping[str, np.ndarray],
                      abstract: Mapping[str, Any], *, num_layers: int,
                      source_name: str = '<checkpoint>') -> dict[str, Any]:
  """Converts a Hugging Face CLIP text state dict into Flax params.

  Args:
    tensors: flat {key: array}, e.g. from `core.load_safetensors`.
    abstract: the 'params' collection of `ClipTextTransformer`, abstract
      (`abstract_params`) or concrete.
    num_layers: transformer blocks of the target model.
    source_name: file name for error messages.

  Returns:
    The nested param dict (numpy arrays, the target's dtype).

  Raises:
    core.ConversionError: no CLIP text tower in the file, a key missing or
      unused, or a tensor of the wrong shape (names the key and both shapes).
  """
  prefix = core.detect_prefix(list(tensors), _ANCHOR, TOWER_PREFIXES,
                              source_name=source_name)
  rules = clip_text_rules(num_layers, tower_prefix=prefix)
  try:
    return core.convert(tensors, rules, abstract, ignore=IGNORED,
                        source_name=source_name)
  except core.ConversionError as e:
    mismatch = _tower_mismatch(tensors, prefix, abstract, num_layers)
    if mismatch is None:
      raise
    details = str(e).removeprefix(f'{source_name}: ')
    raise core.ConversionError(
        f'{source_name}: {mismatch}\n{details}') from None


# --- Model folders ------------------------------------------------------------


def load_weights(model_dir: str | os.PathLike[str], variant: str | None = None
                 ) -> tuple[dict[str, np.ndarray], str]:
  """Reads `model[.variant].safetensors` (or a sharded index) from a folder.

  Returns:
    (flat tensors, the file name to use in error messages).

  Raises:
    FileNotFoundError: no such safetensors file (says when only pickled
      weights or other variants are there).
    core.ConversionError: an unreadable file or a bad shard index.
  """
  model_dir = pathlib.Path(model_dir)
  if variant is None:
    return clip_convert.load_weights(model_dir)
  path = model_dir / f'{WEIGHTS_NAME}.{variant}.safetensors'
  if path.is_file():
    return core.load_safetensors(path), str(path)
  present = sorted(p.name for p in model_dir.glob('*.safetensors'))
  raise FileNotFoundError(f'{model_dir}: no {path.name} (variant '
                          f'{variant!r}); safetensors files there: {present}')


def load_clip_text(model_dir: str | os.PathLike[str], *,
                   variant: str | None = None
                   ) -> tuple[clip_text.ClipTextConfig, dict[str, Any]]:
  """Loads a Hugging Face CLIP text tower (e.g. `<sd_dir>/text_encoder`).

  Reads `config.json` and `model[.variant].safetensors`; never unpickles.

  Returns:
    (config, params): `ClipTextTransformer(config).apply({'params': params},
    input_ids_BxT)` runs the tower (numpy float32 params).

  Raises:
    FileNotFoundError: a missing folder, config.json or safetensors weights.
    ValueError: config.json is not a CLIP text config.
    core.ConversionError: the weights do not fit the config.
  """
  model_dir = pathlib.Path(model_dir)
  if not model_dir.is_dir():
    raise FileNotFoundError(f'CLIP text model folder not found: {model_dir}')
  config = read_config(model_dir)
  tensors, source_name = load_weights(model_dir, variant)
  params = convert_clip_text(tensors, abstract_params(config),
                             num_layers=config.layers,
                             source_name=source_name)
  return config, params

