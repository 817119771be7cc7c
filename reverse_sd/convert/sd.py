"""Mapping tables: diffusers Stable Diffusion U-Net and VAE -> the Flax ports.

Source layout: a diffusers pipeline folder (`save_pretrained` /
`snapshot_download` of e.g. runwayml/stable-diffusion-v1-5 or
stabilityai/stable-diffusion-2-1):

  <sd_dir>/unet/config.json, diffusion_pytorch_model.safetensors
      UNet2DConditionModel: `conv_in.*`, `time_embedding.linear_{1,2}.*`,
      `down_blocks.{i}.resnets.{j}.*`, `down_blocks.{i}.attentions.{j}.*`,
      `down_blocks.{i}.downsamplers.0.conv.*`, `mid_block.*`; the up blocks
      and the output head (`up_blocks.*`, `conv_norm_out.*`, `conv_out.*`)
      are ignored explicitly.
  <sd_dir>/vae/config.json, diffusion_pytorch_model.safetensors
      AutoencoderKL: `encoder.*` and `quant_conv.*`; the decoder and
      `post_quant_conv.*` are ignored explicitly. The mid-block attention's
      pre-0.14 names (`query`, `key`, `value`, `proj_attn`) are read as
      diffusers reads them (`to_q`, `to_k`, `to_v`, `to_out.0`).

Targets: `sd_unet.UNetEncoder` and `sd_vae.VAEEncoder` params. Conv weights
[O, I, kh, kw] -> [kh, kw, I, O]; Linear weights transposed; a
Transformer2DModel's proj_in/proj_out are 1x1 convs [O, I, 1, 1] in SD 1.x
checkpoints and Linear [O, I] in SD 2.x (`use_linear_projection`), both
becoming the same Dense kernel [I, O]. Every other key is reported as unused;
nothing is dropped silently. Weights may be float16 or bfloat16 (read as
float32 params).

The up path and the VAE decoder have tables too (`unet_decoder_rules`,
`vae_decoder_rules`, for `diffusion_unet.DiffusionUNet` and
`autoencoder.AutoencoderKL`); `reverse_sd.convert.sd_export` runs all four
tables backwards to save the miniature loop's generator as a diffusers
folder that the loaders here read.

Checkpoints are read as safetensors only; pickled `.bin` / `.ckpt` files are
refused.
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

from reverse_sd.convert import core
from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae

UNET_SUBFOLDER = 'unet'
VAE_SUBFOLDER = 'vae'
CONFIG_FILE = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model'
_PICKLE_SUFFIXES = ('.bin', '.ckpt', '.pt', '.pth', '.pkl')

# Source keys that are deliberately unused (full-match regexes).
UNET_IGNORED = (r'up_blocks\..*', r'conv_norm_out\..*', r'conv_out\..*')
VAE_IGNORED = (r'decoder\..*', r'post_quant_conv\..*')

# diffusers' VAE attention names (current, pre-0.14 deprecated block).
_VAE_ATTENTION_NAMES = {'to_q': 'to_q', 'to_k': 'to_k', 'to_v': 'to_v',
                        'to_out': 'to_out.0'}
_VAE_DEPRECATED_ATTENTION_NAMES = {'to_q': 'query', 'to_k': 'key',
                                   'to_v': 'value', 'to_out': 'proj_attn'}


# --- config.json --------------------------------------------------------------

# UNet2DConditionModel options this port does not implement, with the only
# value it accepts (diffusers' default, which SD 1.x and 2.x use).
_UNET_FIXED = {
    'act_fn': 'silu',
    'time_embedding_type': 'positional',
    'resnet_time_scale_shift': 'default',
    'mid_block_type': 'UNetMidBlock2DCrossAttn',
    'attention_type': 'default',
    'num_attention_heads': None,
    'num_class_embeds': None,
    'class_embeddings_concat': False,
    'addition_embed_type': None,
    'encoder_hid_dim': None,
    'encoder_hid_dim_type': None,
    'time_cond_proj_dim': None,
    'timestep_post_act': None,
    'time_embedding_act_fn': None,
    'cross_attention_norm': None,
    'dual_cross_attention': False,
    'center_input_sample': False,
}
_VAE_FIXED = {'act_fn': 'silu'}


def unet_config_from_diffusers(config_json: Mapping[str, Any], *,
                               source_name: str = '<config>'
                               ) -> sd_unet.UNetConfig:
  """`UNetConfig` of a diffusers `UNet2DConditionModel` config.json dict.

  Missing keys take diffusers' defaults, as diffusers does. diffusers'
  `attention_head_dim` becomes the per-block HEAD COUNT (see
  `sd_unet`'s docstring).

  Raises:
    ValueError: not a UNet2DConditionModel config, or one using an option
      this port does not implement (names the key, its value and the file).
  """
  get = _getter(config_json, source_name, 'UNet2DConditionModel', _UNET_FIXED)
  down_block_types = tuple(get('down_block_types', (
      'CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)))
  blocks = len(down_block_types)
  unsupported = [t for t in down_block_types
                 if t not in sd_unet.DOWN_BLOCK_TYPES]
  if unsupported:
    raise ValueError(f'{source_name}: down_block_types {unsupported} are not '
                     f'supported (only {list(sd_unet.DOWN_BLOCK_TYPES)})')
  per_block = lambda key, default: _per_block(get(key, default), blocks, key,
                                              source_name)
  only_cross = per_block('only_cross_attention', False)
  if any(only_cross):
    raise ValueError(f'{source_name}: only_cross_attention={only_cross} is '
                     'not supported')
  class_embed_type = get('class_embed_type', None)
  if class_embed_type not in (None, 'projection'):
    raise ValueError(f'{source_name}: class_embed_type={class_embed_type!r} '
                     "is not supported (only None and 'projection')")
  class_dim = (get('projection_class_embeddings_input_dim', None)
               if class_embed_type == 'projection' else None)
  if class_embed_type == 'projection' and class_dim is None:
    raise ValueError(f"{source_name}: class_embed_type='projection' needs "
                     'projection_class_embeddings_input_dim')
  cross_attention_dims = set(per_block('cross_attention_dim', 1280))
  if len(cross_attention_dims) != 1:
    raise ValueError(f'{source_name}: per-block cross_attention_dim '
                     f'{sorted(cross_attention_dims)} is not supported')
  try:
    return sd_unet.UNetConfig(
        block_out_channels=tuple(get('block_out_channels',
                                     (320, 640, 1280, 1280))),
        down_block_types=down_block_types,
        layers_per_block=per_block('layers_per_block', 2),
        num_attention_heads=per_block('attention_head_dim', 8),
        transformer_layers_per_block=per_block(
            'transformer_layers_per_block', 1),
        cross_attention_dim=cross_attention_dims.pop(),
        use_linear_projection=bool(get('use_linear_projection', False)),
        upcast_attention=bool(get('upcast_attention', False)),
        in_channels=get('in_channels', 4),
        norm_num_groups=get('norm_num_groups', 32),
        norm_eps=float(get('norm_eps', 1e-5)),
        flip_sin_to_cos=bool(get('flip_sin_to_cos', True)),
        freq_shift=float(get('freq_shift', 0)),
        downsample_padding=get('downsample_padding', 1),
        mid_block_scale_factor=float(get('mid_block_scale_factor', 1)),
        conv_in_kernel=get('conv_in_kernel', 3),
        time_embedding_dim=get('time_embedding_dim', None),
        projection_class_embeddings_input_dim=class_dim)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{source_name}: {e}') from e


def vae_config_from_diffusers(config_json: Mapping[str, Any], *,
                              source_name: str = '<config>'
                              ) -> sd_vae.VAEConfig:
  """`VAEConfig` of a diffusers `AutoencoderKL` config.json dict.

  Missing keys take diffusers' defaults, as diffusers does.

  Raises:
    ValueError: not an AutoencoderKL config, or one this port cannot run.
  """
  get = _getter(config_json, source_name, 'AutoencoderKL', _VAE_FIXED)
  shift_factor = get('shift_factor', None)
  try:
    return sd_vae.VAEConfig(
        block_out_channels=tuple(get('block_out_channels', (64,))),
        layers_per_block=get('layers_per_block', 1),
        norm_num_groups=get('norm_num_groups', 32),
        latent_channels=get('latent_channels', 4),
        in_channels=get('in_channels', 3),
        down_block_types=tuple(get('down_block_types',
                                   (sd_vae.DOWN_ENCODER_BLOCK,))),
        scaling_factor=float(get('scaling_factor', 0.18215)),
        shift_factor=float(shift_factor or 0.0),
        use_quant_conv=bool(get('use_quant_conv', True)),
        mid_block_add_attention=bool(get('mid_block_add_attention', True)))
  except (ValueError, TypeError) as e:
    raise ValueError(f'{source_name}: {e}') from e


def _getter(config_json, source_name, class_name, fixed):
  """Returns get(key, default); first checks the class and the fixed keys."""
  if not isinstance(config_json, Mapping):
    raise ValueError(f'{source_name}: expected a JSON object, got '
                     f'{type(config_json).__name__}')
  found_class = config_json.get('_class_name', class_name)
  if found_class != class_name:
    raise ValueError(f'{source_name}: _class_name {found_class!r}; expected '
                     f'{class_name!r} (is this the right subfolder?)')
  for key, accepted in fixed.items():
    value = config_json.get(key, accepted)
    if value != accepted:
      raise ValueError(f'{source_name}: {key}={value!r} is not supported by '
                       f'this port (only {accepted!r})')
  return lambda key, default: config_json.get(key, default)


def _per_block(value, blocks: int, key: str, source_name: str) -> tuple:
  """An int/bool for every block, or a list with one entry per block."""
  if isinstance(value, (list, tuple)):
    if len(value) != blocks or any(isinstance(v, (list, tuple))
                                   for v in value):
      raise ValueError(f'{source_name}: {key}={list(value)} must be one '
                       f'value or one value per down block ({blocks})')
    return tuple(value)
  return (value,) * blocks


def read_unet_config(sd_dir: str | os.PathLike[str]) -> sd_unet.UNetConfig:
  """`unet_config_from_diffusers` of `<sd_dir>/unet/config.json`."""
  path = pathlib.Path(sd_dir) / UNET_SUBFOLDER / CONFIG_FILE
  return unet_config_from_diffusers(_read_json(path), source_name=str(path))


def read_vae_config(sd_dir: str | os.PathLike[str]) -> sd_vae.VAEConfig:
  """`vae_config_from_diffusers` of `<sd_dir>/vae/config.json`."""
  path = pathlib.Path(sd_dir) / VAE_SUBFOLDER / CONFIG_FILE
  return vae_config_from_diffusers(_read_json(path), source_name=str(path))


def _read_json(path: pathlib.Path) -> Any:
  if not path.is_file():
    raise FileNotFoundError(f'{path}: not found (a diffusers pipeline folder '
                            'has unet/ and vae/ subfolders, each with '
                            'config.json next to the weights).')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e


# --- Tables -------------------------------------------------------------------


_norm = core.layer_norm_rules


def _conv(source: str, target: str) -> list[core.Rule]:
  return [core.Rule(f'{source}.weight', f'{target}/kernel', core.conv_kernel),
          core.Rule(f'{source}.bias', f'{target}/bias')]


def _dense(source: str, target: str, bias: bool = True,
           transform: core.Transform = core.transpose) -> list[core.Rule]:
  rules = [core.Rule(f'{source}.weight', f'{target}/kernel', transform)]
  if bias:
    rules.append(core.Rule(f'{source}.bias', f'{target}/bias'))
  return rules


def conv1x1_to_dense(x: np.ndarray) -> np.ndarray:
  """1x1 conv weight [O, I, 1, 1] -> Dense kernel [I, O]."""
  if x.ndim != 4 or x.shape[2:] != (1, 1):
    raise ValueError(f'conv1x1_to_dense expects a [O, I, 1, 1] conv weight, '
                     f'got shape {x.shape}')
  return x[:, :, 0, 0].T


def _resnet(source: str, target: str, *, time_embedding: bool,
            shortcut: bool) -> list[core.Rule]:
  rules = (_norm(f'{source}.norm1', f'{target}/norm1') +
           _conv(f'{source}.conv1', f'{target}/conv1') +
           _norm(f'{source}.norm2', f'{target}/norm2') +
           _conv(f'{source}.conv2', f'{target}/conv2'))
  if time_embedding:
    rules += _dense(f'{source}.time_emb_proj', f'{target}/time_emb_proj')
  if shortcut:
    rules += _conv(f'{source}.conv_shortcut', f'{target}/conv_shortcut')
  return rules


def _transformer(source: str, target: str, *, num_layers: int,
                 linear_projection: bool) -> list[core.Rule]:
  """Transformer2DModel: norm, proj_in, transformer_blocks, proj_out."""
  projection = core.transpose if linear_projection else conv1x1_to_dense
  rules = (_norm(f'{source}.norm', f'{target}/norm') +
           _dense(f'{source}.proj_in', f'{target}/proj_in',
                  transform=projection) +
           _dense(f'{source}.proj_out', f'{target}/proj_out',
                  transform=projection))
  for k in range(num_layers):
    src = f'{source}.transformer_blocks.{k}'
    dst = f'{target}/transformer_blocks_{k}'
    for norm in ('norm1', 'norm2', 'norm3'):
      rules += _norm(f'{src}.{norm}', f'{dst}/{norm}')
    for attn in ('attn1', 'attn2'):
      for proj in ('to_q', 'to_k', 'to_v'):
        rules += _dense(f'{src}.{attn}.{proj}', f'{dst}/{attn}/{proj}',
                        bias=False)
      rules += _dense(f'{src}.{attn}.to_out.0', f'{dst}/{attn}/to_out')
    rules += (_dense(f'{src}.ff.net.0.proj', f'{dst}/ff/geglu_proj') +
              _dense(f'{src}.ff.net.2', f'{dst}/ff/out_proj'))
  return rules


def unet_encoder_rules(config: sd_unet.UNetConfig) -> list[core.Rule]:
  """The table from a UNet2DConditionModel's keys to `UNetEncoder` params."""
  rules = (_conv('conv_in', 'conv_in') +
           _dense('time_embedding.linear_1', 'time_embedding/linear_1') +
           _dense('time_embedding.linear_2', 'time_embedding/linear_2'))
  if config.projection_class_embeddings_input_dim is not None:
    rules += (_dense('class_embedding.linear_1', 'class_embedding/linear_1') +
              _dense('class_embedding.linear_2', 'class_embedding/linear_2'))
  in_channels = config.block_out_channels[0]
  last = len(config.block_out_channels) - 1
  for i, channels in enumerate(config.block_out_channels):
    for j in range(config.layers_per_block[i]):
      rules += _resnet(f'down_blocks.{i}.resnets.{j}',
                       f'down_blocks_{i}/resnets_{j}', time_embedding=True,
                       shortcut=j == 0 and in_channels != channels)
      if config.down_block_types[i] == sd_unet.CROSS_ATTN_DOWN_BLOCK:
        rules += _transformer(
            f'down_blocks.{i}.attentions.{j}',
            f'down_blocks_{i}/attentions_{j}',
            num_layers=config.transformer_layers_per_block[i],
            linear_projection=config.use_linear_projection)
    if i != last:
      rules += _conv(f'down_blocks.{i}.downsamplers.0.conv',
                     f'down_blocks_{i}/downsamplers_0/conv')
    in_channels = channels
  for j in range(2):
    rules += _resnet(f'mid_block.resnets.{j}', f'mid_block/resnets_{j}',
                     time_embedding=True, shortcut=False)
  rules += _transformer('mid_block.attentions.0', 'mid_block/attentions_0',
                        num_layers=config.transformer_layers_per_block[-1],
                        linear_projection=config.use_linear_projection)
  return rules


def vae_encoder_rules(config: sd_vae.VAEConfig, *,
                      deprecated_attention_names: bool = False
                      ) -> list[core.Rule]:
  """The table from an AutoencoderKL's encoder keys to `VAEEncoder` params.

  Args:
    config: the VAE's shape.
    deprecated_attention_names: the checkpoint names the mid-block attention
      `query`/`key`/`value`/`proj_attn` (diffusers < 0.14 saves).
  """
  rules = _conv('encoder.conv_in', 'conv_in')
  in_channels = config.block_out_channels[0]
  last = len(config.block_out_channels) - 1
  for i, channels in enumerate(config.block_out_channels):
    for j in range(config.layers_per_block):
      rules += _resnet(f'encoder.down_blocks.{i}.resnets.{j}',
                       f'down_blocks_{i}/resnets_{j}', time_embedding=False,
                       shortcut=j == 0 and in_channels != channels)
    if i != last:
      rules += _conv(f'encoder.down_blocks.{i}.downsamplers.0.conv',
                     f'down_blocks_{i}/downsamplers_0/conv')
    in_channels = channels
  for j in range(2):
    rules += _resnet(f'encoder.mid_block.resnets.{j}', f'mid_block/resnets_{j}',
                     time_embedding=False, shortcut=False)
  if config.mid_block_add_attention:
    source, target = 'encoder.mid_block.attentions.0', 'mid_block/attentions_0'
    names = (_VAE_DEPRECATED_ATTENTION_NAMES if deprecated_attention_names
             else _VAE_ATTENTION_NAMES)
    rules += _norm(f'{source}.group_norm', f'{target}/group_norm')
    for name, source_name in names.items():
      rules += _dense(f'{source}.{source_name}', f'{target}/{name}')
  rules += (_norm('encoder.conv_norm_out', 'conv_norm_out') +
            _conv('encoder.conv_out', 'conv_out'))
  if config.use_quant_conv:
    rules += _conv('quant_conv', 'quant_conv')
  return rules


def unet_decoder_rules(config: sd_unet.UNetConfig) -> list[core.Rule]:
  """The table from a UNet2DConditionModel's up path and output head to the
  params of `diffusion_unet.DiffusionUNet` outside its `encoder`.

  diffusers numbers up blocks from the bottom (`up_blocks.0` mirrors the last
  down block); up block k has `layers_per_block + 1` resnets, each on its
  input concatenated with a skip (so every one has a `conv_shortcut`), a
  Transformer2DModel after each resnet in a `CrossAttnUpBlock2D`, and an
  upsampler except in the last block. Channel counts follow diffusers'
  `UNet2DConditionModel.__init__`.
  """
  channels = tuple(reversed(config.block_out_channels))
  blocks = len(channels)
  rules = []
  prev_channels = channels[0]
  for k, out_channels in enumerate(channels):
    i = blocks - 1 - k  # The mirrored down block.
    block_in_channels = channels[min(k + 1, blocks - 1)]
    num_layers = config.layers_per_block[i] + 1
    for j in range(num_layers):
      skip_channels = block_in_channels if j == num_layers - 1 else (
          out_channels)
      resnet_in_channels = prev_channels if j == 0 else out_channels
      rules += _resnet(
          f'up_blocks.{k}.resnets.{j}', f'up_blocks_{k}/resnets_{j}',
          time_embedding=True,
          shortcut=resnet_in_channels + skip_channels != out_channels)
      if config.down_block_types[i] == sd_unet.CROSS_ATTN_DOWN_BLOCK:
        rules += _transformer(
            f'up_blocks.{k}.attentions.{j}', f'up_blocks_{k}/attentions_{j}',
            num_layers=config.transformer_layers_per_block[i],
            linear_projection=config.use_linear_projection)
    if k != blocks - 1:
      rules += _conv(f'up_blocks.{k}.upsamplers.0.conv',
                     f'up_blocks_{k}/upsamplers_0/conv')
    prev_channels = out_channels
  rules += _norm('conv_norm_out', 'conv_norm_out') + _conv('conv_out',
                                                           'conv_out')
  return rules


def vae_decoder_rules(config: sd_vae.VAEConfig, *,
                      deprecated_attention_names: bool = False
                      ) -> list[core.Rule]:
  """The table from an AutoencoderKL's `decoder.*` and `post_quant_conv.*`
  keys to `autoencoder.VAEDecoder` params (the `decoder` subtree of an
  `AutoencoderKL`, which holds `post_quant_conv`).

  Args:
    config: the VAE's shape (the decoder mirrors the encoder).
    deprecated_attention_names: as for `vae_encoder_rules`.
  """
  channels = tuple(reversed(config.block_out_channels))
  rules = []
  if config.use_quant_conv:
    rules += _conv('post_quant_conv', 'post_quant_conv')
  rules += _conv('decoder.conv_in', 'conv_in')
  for j in range(2):
    rules += _resnet(f'decoder.mid_block.resnets.{j}',
                     f'mid_block/resnets_{j}', time_embedding=False,
                     shortcut=False)
  if config.mid_block_add_attention:
    source, target = 'decoder.mid_block.attentions.0', 'mid_block/attentions_0'
    names = (_VAE_DEPRECATED_ATTENTION_NAMES if deprecated_attention_names
             else _VAE_ATTENTION_NAMES)
    rules += _norm(f'{source}.group_norm', f'{target}/group_norm')
    for name, source_name in names.items():
      rules += _dense(f'{source}.{source_name}', f'{target}/{name}')
  prev_channels = channels[0]
  for i, out_channels in enumerate(channels):
    for j in range(config.layers_per_block + 1):
      in_channels = prev_channels if j == 0 else out_channels
      rules += _resnet(f'decoder.up_blocks.{i}.resnets.{j}',
                       f'up_blocks_{i}/resnets_{j}', time_embedding=False,
                       shortcut=in_channels != out_channels)
    if i != len(channels) - 1:
      rules += _conv(f'decoder.up_blocks.{i}.upsamplers.0.conv',
                     f'up_blocks_{i}/upsamplers_0/conv')
    prev_channels = out_channels
  rules += (_norm('decoder.conv_norm_out', 'conv_norm_out') +
            _conv('decoder.conv_out', 'conv_out'))
  return rules


# --- Conversion ---------------------------------------------------------------


def abstract_unet_params(config: sd_unet.UNetConfig) -> dict[str, Any]:
  """`UNetEncoder(config)`'s params as ShapeDtypeStructs (nothing allocated)."""
  side = config.downsample_factor
  model = sd_unet.UNetEncoder(config)
  return jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32),
      jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim),
                           jnp.float32))['params']


def abstract_vae_params(config: sd_vae.VAEConfig) -> dict[str, Any]:
  """`VAEEncoder(config)`'s params as ShapeDtypeStructs (nothing allocated)."""
  side = config.downsample_factor
  model = sd_vae.VAEEncoder(config)
  return jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, side, side, config.in_channels),
                           jnp.float32))['params']


def convert_unet_encoder(tensors: Mapping[str, np.ndarray],
                         abstract_params: Mapping[str, Any],
                         config: sd_unet.UNetConfig, *,
                         source_name: str = '<checkpoint>') -> dict[str, Any]:
  """UNet2DConditionModel safetensors -> `UNetEncoder` params (numpy).

  Raises:
    core.ConversionError: a key is missing, unused (and not an up-block or
      output-head key) or has the wrong shape; names the key and the shapes.
  """
  _check_anchor(tensors, 'conv_in.weight', source_name)
  return core.convert(tensors, unet_encoder_rules(config), abstract_params,
                      ignore=UNET_IGNORED, source_name=source_name)


def convert_vae_encoder(tensors: Mapping[str, np.ndarray],
                        abstract_params: Mapping[str, Any],
                        config: sd_vae.VAEConfig, *,
                        source_name: str = '<checkpoint>') -> dict[str, Any]:
  """AutoencoderKL safetensors -> `VAEEncoder` params (numpy).

  Raises:
    core.ConversionError: a key is missing, unused (and not a decoder key) or
      has the wrong shape; names the key and the shapes.
  """
  _check_anchor(tensors, 'encoder.conv_in.weight', source_name)
  deprecated = 'encoder.mid_block.attentions.0.query.weight' in tensors
  rules = vae_encoder_rules(config, deprecated_attention_names=deprecated)
  return core.convert(tensors, rules, abstract_params, ignore=VAE_IGNORED,
                      source_name=source_name)


def _check_anchor(tensors: Mapping[str, np.ndarray], anchor: str,
                  source_name: str) -> None:
  """A clear error for a checkpoint that is not in diffusers' layout."""
  if anchor in tensors:
    return
  hint = ''
  if any(key.startswith('model.diffusion_model.') or
         key.startswith('first_stage_model.') for key in tensors):
    hint = (' It looks like an original (CompVis / single-file) Stable '
            'Diffusion checkpoint: convert it to a diffusers folder once, '
            'e.g. `StableDiffusionPipeline.from_single_file(path)'
            '.save_pretrained(out_dir, safe_serialization=True)`.')
  raise core.ConversionError(
      f'{source_name}: no {anchor!r}; not a diffusers-format checkpoint of '
      f'this model.{hint} First keys: {sorted(tensors)[:5]}')


# --- Pipeline folders ---------------------------------------------------------


def load_weights(model_dir: str | os.PathLike[str], variant: str | None = None
                 ) -> tuple[dict[str, np.ndarray], str]:
  """Reads `diffusion_pytorch_model[.variant].safetensors` from a subfolder.

  Returns:
    (flat tensors, the file name to use in error messages).

  Raises:
    FileNotFoundError: no such safetensors file (says when only pickled
      weights, another variant or a sharded checkpoint are there).
    core.ConversionError: the file is not readable safetensors.
  """
  model_dir = pathlib.Path(model_dir)
  stem = WEIGHTS_NAME if variant is None else f'{WEIGHTS_NAME}.{variant}'
  path = model_dir / f'{stem}.safetensors'
  if path.is_file():
    return core.load_safetensors(path), str(path)
  present = sorted(p.name for p in model_dir.iterdir()) if (
      model_dir.is_dir()) else []
  pickled = [name for name in present if name.endswith(_PICKLE_SUFFIXES)]
  other = [name for name in present if name.endswith('.safetensors') or
           name.endswith('.safetensors.index.json')]
  if pickled and not other:
    raise FileNotFoundError(
        f'{model_dir}: has {pickled} but no {path.name}. Pickled weights are '
        'never loaded here (unpickling runs code). Convert them to '
        'safetensors once, in a separate trusted environment with diffusers, '
        'e.g. `UNet2DConditionModel.from_pretrained(dir).save_pretrained('
        'out_dir, safe_serialization=True)` (AutoencoderKL for vae/).')
  if other:
    raise FileNotFoundError(
        f'{model_dir}: no {path.name}; found {other}. Pass variant= for a '
        "variant file (e.g. variant='fp16' for "
        f'{WEIGHTS_NAME}.fp16.safetensors); sharded checkpoints '
        '(.safetensors.index.json) are not supported yet.')
  raise FileNotFoundError(f'{model_dir}: no {path.name} found.')


def load_unet_encoder(sd_dir: str | os.PathLike[str], *,
                      variant: str | None = None
                      ) -> tuple[sd_unet.UNetConfig, dict[str, Any]]:
  """Loads the U-Net encoder of a diffusers Stable Diffusion folder.

  Reads `<sd_dir>/unet/config.json` and
  `<sd_dir>/unet/diffusion_pytorch_model[.variant].safetensors`; never
  unpickles.

  Returns:
    (config, params): `UNetEncoder(config).apply({'params': params},
    latents_BxHxWx4, timesteps, context_BxTxE)` runs it (numpy params).

  Raises:
    FileNotFoundError: a missing folder, config.json or safetensors weights.
    ValueError: config.json is not a UNet2DConditionModel this port runs.
    core.ConversionError: the weights do not fit the config (names the key
      and both shapes).
  """
  config = read_unet_config(sd_dir)
  tensors, source_name = load_weights(pathlib.Path(sd_dir) / UNET_SUBFOLDER,
                                      variant)
  params = convert_unet_encoder(tensors, abstract_unet_params(config), config,
                                source_name=source_name)
  return config, params


def load_vae_encoder(sd_dir: str | os.PathLike[str], *,
                     variant: str | None = None
                     ) -> tuple[sd_vae.VAEConfig, dict[str, Any]]:
  """Loads the VAE encoder of a diffusers Stable Diffusion folder.

  Reads `<sd_dir>/vae/config.json` and
  `<sd_dir>/vae/diffusion_pytorch_model[.variant].safetensors`; never
  unpickles.

  Returns:
    (config, params): `VAEEncoder(config).apply({'params': params},
    images_BxHxWx3)` gives (mean, logvar); `method=VAEEncoder.latents` the
    scaled latents.

  Raises:
    FileNotFoundError: a missing folder, config.json or safetensors weights.
    ValueError: config.json is not an AutoencoderKL this port runs.
    core.ConversionError: the weights do not fit the config.
  """
  config = read_vae_config(sd_dir)
  tensors, source_name = load_weights(pathlib.Path(sd_dir) / VAE_SUBFOLDER,
                                      variant)
  params = convert_vae_encoder(tensors, abstract_vae_params(config), config,
                               source_name=source_name)
  return config, params

