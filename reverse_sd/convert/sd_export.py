"""Writes the Flax SD U-Net and VAE as a diffusers pipeline folder.

The inverse of `reverse_sd.convert.sd`: the miniature loop's generator
(`diffusion_unet.DiffusionUNet`, `autoencoder.AutoencoderKL`) is saved as

  <out_dir>/unet/config.json, diffusion_pytorch_model.safetensors
  <out_dir>/vae/config.json, diffusion_pytorch_model.safetensors

in diffusers' `UNet2DConditionModel` / `AutoencoderKL` layout, so the
white-box reverse model loads the generator's U-Net and VAE encoders with the
very loaders (`sd.load_unet_encoder`, `sd.load_vae_encoder`) that load
SD 1.5 and 2.1.

Nothing here has its own key map: the mapping tables of `sd`
(`unet_encoder_rules`, `unet_decoder_rules`, `vae_encoder_rules`,
`vae_decoder_rules`) are run backwards, each rule's transform replaced by its
inverse (`INVERSE_TRANSFORMS`). A params tree must fit its config exactly
(every leaf present with its shape, no extra leaf) and every leaf is written
by exactly one rule; otherwise a `core.ConversionError` names the leaves.
Weights are written as float32; everything is checked before anything is
written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from reverse_sd.convert import core
from reverse_sd.convert import sd
from reverse_sd.models import autoencoder
from reverse_sd.models import diffusion_unet
from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae

UNET_CLASS = 'UNet2DConditionModel'
VAE_CLASS = 'AutoencoderKL'
VAE_UP_BLOCK = 'UpDecoderBlock2D'
_ENCODER = diffusion_unet.ENCODER
_DECODER = autoencoder.DECODER


# --- Inverse transforms -------------------------------------------------------


def conv_weight(x: np.ndarray) -> np.ndarray:
  """Flax `nn.Conv` kernel [*spatial, I, O] -> PyTorch weight [O, I, *spatial]
  (inverse of `core.conv_kernel`)."""
  if x.ndim < 3:
    raise ValueError(f'conv_weight expects an N-D conv kernel, got {x.ndim}-D')
  return x.transpose(x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))


def dense_to_conv1x1(x: np.ndarray) -> np.ndarray:
  """Dense kernel [I, O] -> 1x1 conv weight [O, I, 1, 1] (inverse of
  `sd.conv1x1_to_dense`)."""
  if x.ndim != 2:
    raise ValueError(f'dense_to_conv1x1 expects a 2-D kernel, got {x.ndim}-D')
  return x.T[:, :, None, None]


# Each transform the loading tables use -> the transform that undoes it.
INVERSE_TRANSFORMS = {
    core.identity: core.identity,
    core.transpose: core.transpose,
    core.conv_kernel: conv_weight,
    sd.conv1x1_to_dense: dense_to_conv1x1,
}


# --- Tables for whole models --------------------------------------------------


def _under(rules: Sequence[core.Rule], parent: str) -> list[core.Rule]:
  """`rules` with their targets moved below `parent` in the params tree."""
  return [core.Rule(rule.source, f'{parent}/{rule.target}', rule.transform)
          for rule in rules]


def full_unet_rules(config: sd_unet.UNetConfig) -> list[core.Rule]:
  """Every UNet2DConditionModel key -> `DiffusionUNet` params."""
  return (_under(sd.unet_encoder_rules(config), _ENCODER) +
          sd.unet_decoder_rules(config))


def autoencoder_rules(config: sd_vae.VAEConfig, *,
                      deprecated_attention_names: bool = False
                      ) -> list[core.Rule]:
  """Every AutoencoderKL key -> `AutoencoderKL` params."""
  encoder = sd.vae_encoder_rules(
      config, deprecated_attention_names=deprecated_attention_names)
  decoder = sd.vae_decoder_rules(
      config, deprecated_attention_names=deprecated_attention_names)
  return _under(encoder, _ENCODER) + _under(decoder, _DECODER)


def abstract_diffusion_unet_params(config: sd_unet.UNetConfig
                                   ) -> dict[str, Any]:
  """`DiffusionUNet(config)`'s params as ShapeDtypeStructs."""
  side = config.downsample_factor
  return jax.eval_shape(
      diffusion_unet.DiffusionUNet(config).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32),
      jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim),
                           jnp.float32))['params']


def abstract_autoencoder_params(config: sd_vae.VAEConfig) -> dict[str, Any]:
  """`AutoencoderKL(config)`'s params as ShapeDtypeStructs."""
  side = config.downsample_factor
  return jax.eval_shape(
      autoencoder.AutoencoderKL(config).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, side, side, config.in_channels),
                           jnp.float32))['params']


# --- Params -> tensors --------------------------------------------------------


def params_to_tensors(params: Mapping[str, Any],
                      rules: Sequence[core.Rule],
                      abstract_params: Mapping[str, Any], *,
                      name: str = '<params>') -> dict[str, np.ndarray]:
  """Runs a loading table backwards: Flax params -> flat PyTorch tensors.

  Args:
    params: nested params (numpy or jax arrays).
    rules: the table that loads these params (source key -> target leaf).
    abstract_params: what `params` must look like (leaf paths and shapes).
    name: what `params` are, for error messages.

  Returns:
    {diffusers key: array} in the source layout, one entry per rule.

  Raises:
    core.ConversionError: a leaf is missing, extra or of the wrong shape, a
      leaf has no rule or two, or a rule names no leaf (all listed).
  """
  flat = core.flatten_params(params)
  expected = core.flatten_params(abstract_params)
  problems = []
  for path in sorted(set(expected) - set(flat)):
    problems.append(f'missing param {path!r} (shape '
                    f'{tuple(expected[path].shape)})')
  for path in sorted(set(flat) - set(expected)):
    problems.append(f'unexpected param {path!r} (shape '
                    f'{tuple(np.shape(flat[path]))}): the config has no such '
                    'layer')
  for path in sorted(set(flat) & set(expected)):
    if tuple(np.shape(flat[path])) != tuple(expected[path].shape):
      problems.append(f'param {path!r} has shape {tuple(np.shape(flat[path]))}'
                      f'; the config needs {tuple(expected[path].shape)}')
  _raise_if(problems, name)

  tensors: dict[str, np.ndarray] = {}
  written_by: dict[str, str] = {}
  for rule in rules:
    inverse = INVERSE_TRANSFORMS.get(rule.transform)
    if inverse is None:
      transform = getattr(rule.transform, '__name__', rule.transform)
      problems.append(f'rule {rule.source!r} -> {rule.target!r}: no inverse '
                      f'of transform {transform}')
    elif rule.target not in flat:
      problems.append(f'rule {rule.source!r} -> {rule.target!r}: no such '
                      'param (mapping table out of date?)')
    elif rule.target in written_by:
      problems.append(f'param {rule.target!r} is written twice: as '
                      f'{written_by[rule.target]!r} and {rule.source!r}')
    elif rule.source in tensors:
      problems.append(f'key {rule.source!r} is written by two rules')
    else:
      written_by[rule.target] = rule.source
      tensors[rule.source] = inverse(np.asarray(flat[rule.target]))
  for path in sorted(set(flat) - set(written_by)):
    if not any(rule.target == path for rule in rules):
      problems.append(f'param {path!r} (shape {tuple(np.shape(flat[path]))})'
                      ' has no rule in the mapping table')
  _raise_if(problems, name)
  return tensors


def _raise_if(problems: Sequence[str], name: str) -> None:
  if problems:
    listed = problems[:20]
    more = len(problems) - len(listed)
    raise core.ConversionError(
        f'{name}: cannot export ({len(problems)} problem(s)):\n  ' +
        '\n  '.join(listed) + (f'\n  ... and {more} more' if more else ''))


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Accepts {'params': tree} (a variables dict) as well as the tree."""
  if not isinstance(params, Mapping):
    raise TypeError(f'expected a params dict, got {type(params).__name__}')
  if set(params) == {'params'}:
    return params['params']
  return params


def unet_tensors(config: sd_unet.UNetConfig, params: Mapping[str, Any]
                 ) -> dict[str, np.ndarray]:
  """UNet2DConditionModel state dict of `DiffusionUNet` params (all keys) or
  of bare `UNetEncoder` params (down and mid blocks only)."""
  params = _unwrap(params)
  if _ENCODER in params:
    return params_to_tensors(params, full_unet_rules(config),
                             abstract_diffusion_unet_params(config),
                             name='DiffusionUNet params')
  return params_to_tensors(params, sd.unet_encoder_rules(config),
                           sd.abstract_unet_params(config),
                           name='UNetEncoder params')


def vae_tensors(config: sd_vae.VAEConfig, params: Mapping[str, Any]
                ) -> dict[str, np.ndarray]:
  """AutoencoderKL state dict of `AutoencoderKL` params (all keys) or of bare
  `VAEEncoder` params (`encoder.*` and `quant_conv.*` only)."""
  params = _unwrap(params)
  if _ENCODER in params or _DECODER in params:
    return params_to_tensors(params, autoencoder_rules(config),
                             abstract_autoencoder_params(config),
                             name='AutoencoderKL params')
  return params_to_tensors(params, sd.vae_encoder_rules(config),
                           sd.abstract_vae_params(config),
                           name='VAEEncoder params')


# --- config.json --------------------------------------------------------------


def _one_or_list(values: Sequence[Any]) -> Any:
  """One value when all blocks agree (as the released configs write it)."""
  values = list(values)
  return values[0] if len(set(values)) == 1 else values


def _number(value: float) -> int | float:
  return int(value) if float(value).is_integer() else float(value)


def unet_config_json(config: sd_unet.UNetConfig, *,
                     sample_size: int | None = None) -> dict[str, Any]:
  """diffusers `UNet2DConditionModel` config.json of `config`.

  `sd.unet_config_from_diffusers` reads it back to `config`. The up blocks
  mirror the down blocks; `conv_out_kernel` is `conv_in_kernel` and
  `out_channels` is `in_channels`, as `DiffusionUNet` builds them.
  """
  config_json = {
      '_class_name': UNET_CLASS,
      'act_fn': 'silu',
      'attention_head_dim': _one_or_list(config.num_attention_heads),
      'block_out_channels': list(config.block_out_channels),
      'center_input_sample': False,
      'conv_in_kernel': config.conv_in_kernel,
      'conv_out_kernel': config.conv_in_kernel,
      'cross_attention_dim': config.cross_attention_dim,
      'down_block_types': list(config.down_block_types),
      'downsample_padding': config.downsample_padding,
      'dual_cross_attention': False,
      'flip_sin_to_cos': config.flip_sin_to_cos,
      'freq_shift': _number(config.freq_shift),
      'in_channels': config.in_channels,
      'layers_per_block': _one_or_list(config.layers_per_block),
      'mid_block_scale_factor': _number(config.mid_block_scale_factor),
      'mid_block_type': 'UNetMidBlock2DCrossAttn',
      'norm_eps': config.norm_eps,
      'norm_num_groups': config.norm_num_groups,
      'only_cross_attention': False,
      'out_channels': config.in_channels,
      'resnet_time_scale_shift': 'default',
      'time_embedding_type': 'positional',
      'transformer_layers_per_block': _one_or_list(
          config.transformer_layers_per_block),
      'up_block_types': [diffusion_unet.UP_BLOCK_TYPES[block_type] for
                         block_type in reversed(config.down_block_types)],
      'upcast_attention': config.upcast_attention,
      'use_linear_projection': config.use_linear_projection,
  }
  if config.time_embedding_dim is not None:
    config_json['time_embedding_dim'] = config.time_embedding_dim
  if config.projection_class_embeddings_input_dim is not None:
    config_json['class_embed_type'] = 'projection'
    config_json['projection_class_embeddings_input_dim'] = (
        config.projection_class_embeddings_input_dim)
  if sample_size is not None:
    config_json['sample_size'] = sample_size
  return config_json


def vae_config_json(config: sd_vae.VAEConfig, *,
                    sample_size: int | None = None) -> dict[str, Any]:
  """diffusers `AutoencoderKL` config.json of `config`.

  `sd.vae_config_from_diffusers` reads it back to `config`. The decoder
  mirrors the encoder (`UpDecoderBlock2D`s, `out_channels` = `in_channels`,
  `post_quant_conv` exactly when `quant_conv`), as `AutoencoderKL` builds it.
  """
  config_json = {
      '_class_name': VAE_CLASS,
      'act_fn': 'silu',
      'block_out_channels': list(config.block_out_channels),
      'down_block_types': list(config.down_block_types),
      'in_channels': config.in_channels,
      'latent_channels': config.latent_channels,
      'layers_per_block': config.layers_per_block,
      'mid_block_add_attention': config.mid_block_add_attention,
      'norm_num_groups': config.norm_num_groups,
      'out_channels': config.in_channels,
      'scaling_factor': config.scaling_factor,
      'shift_factor': config.shift_factor or None,
      'up_block_types': [VAE_UP_BLOCK] * len(config.block_out_channels),
      'use_post_quant_conv': config.use_quant_conv,
      'use_quant_conv': config.use_quant_conv,
  }
  if sample_size is not None:
    config_json['sample_size'] = sample_size
  return config_json


# --- Pipeline folders ---------------------------------------------------------


def export_pipeline(out_dir: str | os.PathLike[str], *,
                    unet_config: sd_unet.UNetConfig,
                    unet_params: Mapping[str, Any],
                    vae_config: sd_vae.VAEConfig,
                    vae_params: Mapping[str, Any],
                    image_size: int | None = None) -> pathlib.Path:
  """Writes a diffusers pipeline folder with `unet/` and `vae/`.

  Args:
    out_dir: the folder (created if needed; existing unet/ and vae/ files of
      the same names are replaced).
    unet_config: the U-Net's shape.
    unet_params: `DiffusionUNet` params (every UNet2DConditionModel key is
      written) or `UNetEncoder` params (the down and mid blocks only).
    vae_config: the autoencoder's shape.
    vae_params: `AutoencoderKL` params (encoder and decoder) or `VAEEncoder`
      params (`encoder.*` and `quant_conv.*` only).
    image_size: if given, written as the VAE's `sample_size` (and the
      U-Net's, divided by the VAE's downsampling factor).

  Returns:
    `out_dir` as a path; `sd.load_unet_encoder(out_dir)` and
    `sd.load_vae_encoder(out_dir)` read the encoders back exactly.

  Raises:
    ValueError: the U-Net does not take the VAE's latents.
    core.ConversionError: params do not fit their config (names the leaves).
  """
  if unet_config.in_channels != vae_config.latent_channels:
    raise ValueError(
        f'unet_config.in_channels={unet_config.in_channels} but '
        f'vae_config.latent_channels={vae_config.latent_channels}: the U-Net '
        "must take the VAE's latents")
  # Convert and check everything before writing anything.
  latent_size = None
  if image_size is not None:
    latent_size = image_size // vae_config.downsample_factor
  parts = {
      sd.UNET_SUBFOLDER: (
          unet_config_json(unet_config, sample_size=latent_size),
          unet_tensors(unet_config, unet_params)),
      sd.VAE_SUBFOLDER: (
          vae_config_json(vae_config, sample_size=image_size),
          vae_tensors(vae_config, vae_params)),
  }
  out_dir = pathlib.Path(out_dir)
  for subfolder, (config_json, tensors) in parts.items():
    folder = out_dir / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / sd.CONFIG_FILE,
                      lambda path, c=config_json: path.write_text(
                          json.dumps(c, indent=2, sort_keys=True) + '\n'))
    _write_atomically(
        folder / f'{sd.WEIGHTS_NAME}.safetensors',
        lambda path, t=tensors: safetensors.numpy.save_file(
            {key: np.ascontiguousarray(value, np.float32)
             for key, value in t.items()}, str(path),
            metadata={'format': 'pt'}))
  return out_dir


def _write_atomically(path: pathlib.Path, write) -> None:
  """`write(tmp)`, then renames tmp to `path`: never a half-written file."""
  tmp = path.with_name(f'.{path.name}.tmp')
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


# --- Loading whole models -----------------------------------------------------


def load_full_unet(sd_dir: str | os.PathLike[str], *,
                   variant: str | None = None
                   ) -> tuple[sd_unet.UNetConfig, dict[str, Any]]:
  """(config, `DiffusionUNet` params) of a diffusers folder's `unet/`.

  Raises:
    FileNotFoundError, ValueError, core.ConversionError: as
      `sd.load_unet_encoder`; every key, up path included, must be used.
  """
  config = sd.read_unet_config(sd_dir)
  tensors, source_name = sd.load_weights(
      pathlib.Path(sd_dir) / sd.UNET_SUBFOLDER, variant)
  params = core.convert(tensors, full_unet_rules(config),
                        abstract_diffusion_unet_params(config),
                        source_name=source_name)
  return config, params


def load_autoencoder(sd_dir: str | os.PathLike[str], *,
                     variant: str | None = None
                     ) -> tuple[sd_vae.VAEConfig, dict[str, Any]]:
  """(config, `AutoencoderKL` params) of a diffusers folder's `vae/`.

  Raises:
    FileNotFoundError, ValueError, core.ConversionError: as
      `sd.load_vae_encoder`; every key, decoder included, must be used.
  """
  config = sd.read_vae_config(sd_dir)
  tensors, source_name = sd.load_weights(
      pathlib.Path(sd_dir) / sd.VAE_SUBFOLDER, variant)
  deprecated = 'encoder.mid_block.attentions.0.query.weight' in tensors
  params = core.convert(
      tensors,
      autoencoder_rules(config, deprecated_attention_names=deprecated),
      abstract_autoencoder_params(config), source_name=source_name)
  return config, params
