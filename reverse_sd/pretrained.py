"""Pretrained weights and SD folders, loaded into the models of `models/`.

`models/` is plain Flax and reads no file; this module sits above it and
above the checkpoint converters (`convert/`) and the text encoders (`text/`):

  create_model(config.model, ...)  the model `config.model` names, with the
      white-box backbone's shapes and context read here (`whitebox_parts`)
  load_backbone_params / replace_backbone  the backbone's pretrained weights
      (`config.model.init_from`) placed into a train state's params
  read_configs / load_context / check_caption_encoder  what the white-box
      backbone 'sd_unet' reads from a diffusers SD folder
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from reverse_sd import sharding
from reverse_sd.convert import clip
from reverse_sd.convert import clip_text_weights
from reverse_sd.convert import sd
from reverse_sd.models import reverse_model
from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae
from reverse_sd.models import vit
from reverse_sd.models import whitebox
from reverse_sd.text import sd_context


def create_model(model_config: ml_collections.ConfigDict,
                 embedding_dim: int = 384, **kwargs
                 ) -> reverse_model.ReverseModel:
  """`reverse_model.create_model` for any backbone: for the white-box one
  its shapes and context are read first (`whitebox_parts`)."""
  if model_config.backbone == reverse_model.WHITEBOX:
    unet_config, vae_config = read_configs(model_config)
    kwargs['whitebox_parts'] = (unet_config, vae_config,
                                load_context(model_config, unet_config))
  return reverse_model.create_model(model_config, embedding_dim, **kwargs)


# --- Backbone weights (config.model.init_from) --------------------------------


def load_backbone_params(model_config, image_shape: tuple[int, ...]) -> Any:
  """The backbone's params (numpy) converted from `model_config.init_from`.

  'vit': a Hugging Face CLIP folder; the checkpoint's shape must be the
  configured variant's; position embeddings are interpolated to the input
  size. 'sd_unet': a diffusers Stable Diffusion folder; its VAE encoder and
  U-Net encoder ({'vae': ..., 'unet': ...}; the model's shapes were read from
  the same folder).
  """
  path = model_config.init_from
  if model_config.backbone == reverse_model.WHITEBOX:
    return load_sd_params(model_config)
  if model_config.backbone != 'vit':
    raise ValueError(
        f'config.model.init_from={path!r}: pretrained weights load into the '
        f"'vit' backbone (a Hugging Face CLIP folder) or the 'sd_unet' "
        f'backbone (a diffusers SD folder) only, not '
        f'{model_config.backbone!r}.')
  found, params = clip.load_clip_vision(
      path, image_size=int(image_shape[0]),
      with_projection=bool(model_config.vit_projection))
  expected = vit.VARIANTS[model_config.variant]
  fields = ('patch_size', 'width', 'layers', 'heads', 'mlp_dim', 'activation',
            'layer_norm_eps')
  differ = [f'{f}: checkpoint {getattr(found, f)}, variant '
            f'{getattr(expected, f)}' for f in fields
            if getattr(found, f) != getattr(expected, f)]
  if differ:
    raise ValueError(
        f'The CLIP checkpoint {path} is not a {model_config.variant} tower '
        f'({"; ".join(differ)}). Set config.model.variant to match it.')
  return params


def replace_backbone(params: Any, backbone_params: Any, shardings: Any) -> Any:
  """`params` with its 'backbone' subtree replaced, checked leaf by leaf and
  placed with the params' shardings."""
  expected = {sharding.path_str(p): leaf.shape for p, leaf in
              jax.tree_util.tree_leaves_with_path(params['backbone'])}
  found = {sharding.path_str(p): np.shape(leaf) for p, leaf in
           jax.tree_util.tree_leaves_with_path(backbone_params)}
  problems = [f'{k}: missing in the checkpoint' for k in expected
              if k not in found]
  problems += [f'{k}: not in the model' for k in found if k not in expected]
  problems += [f'{k}: checkpoint {found[k]}, model {expected[k]}'
               for k in expected if k in found and found[k] != expected[k]]
  if problems:
    raise ValueError('Pretrained backbone does not fit the model: ' +
                     '; '.join(problems[:20]))
  merged = dict(params)
  merged['backbone'] = jax.tree.map(
      lambda new, old: np.asarray(new, dtype=old.dtype), backbone_params,
      params['backbone'])
  return jax.device_put(merged, shardings)


# --- The white-box backbone's SD folder ---------------------------------------


def check_sd_folder(path: str | pathlib.Path) -> pathlib.Path:
  """`path` as a diffusers SD pipeline folder, or a clear error."""
  root = pathlib.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(
        f'config.model.init_from={str(path)!r}: no such folder (the '
        "white-box backbone 'sd_unet' reads a diffusers Stable Diffusion "
        'folder with unet/ and vae/ subfolders).')
  missing = [sub for sub in ('unet', whitebox.VAE_SUBFOLDER)
             if not (root / sub).is_dir()]
  if missing:
    found = sorted(p.name for p in root.iterdir())[:10]
    hint = ''
    if (root / 'config.json').is_file() and 'clip' in (
        root / 'config.json').read_text().lower():
      hint = (" It looks like a CLIP checkpoint: that is the 'vit' "
              "backbone's init_from, not the 'sd_unet' backbone's.")
    raise FileNotFoundError(
        f'config.model.init_from={str(path)!r} is not a diffusers Stable '
        f'Diffusion folder: no {"/, ".join(missing)}/ subfolder (found '
        f'{found}).{hint} Save one with StableDiffusionPipeline'
        '.save_pretrained(dir, safe_serialization=True).')
  return root


def _differences(found, expected) -> list[str]:
  found, expected = dataclasses.asdict(found), dataclasses.asdict(expected)
  return [f'{k}: folder {found[k]}, variant {expected[k]}' for k in expected
          if found[k] != expected[k]]


def read_configs(model_config) -> tuple[sd_unet.UNetConfig, sd_vae.VAEConfig]:
  """The (U-Net, VAE) shapes of `config.model` (see `models/whitebox.py`)."""
  variant, path = model_config.variant, model_config.init_from
  variants = whitebox.VARIANTS
  if variant != whitebox.FROM_WEIGHTS and variant not in variants:
    raise ValueError(f'config.model.variant={variant!r} is not an sd_unet '
                     f'variant; expected one of '
                     f'{sorted(variants) + [whitebox.FROM_WEIGHTS]}.')
  if not path:
    if variant == whitebox.FROM_WEIGHTS:
      raise ValueError(f"config.model.variant='{whitebox.FROM_WEIGHTS}' "
                       'reads the shapes from config.model.init_from, which '
                       'is empty.')
    return variants[variant]
  root = check_sd_folder(path)
  unet_config, vae_config = sd.read_unet_config(root), sd.read_vae_config(root)
  if variant != whitebox.FROM_WEIGHTS:
    differ = (_differences(unet_config, variants[variant][0]) +
              _differences(vae_config, variants[variant][1]))
    if differ:
      raise ValueError(
          f'The SD folder {path} is not an {variant} model '
          f'({"; ".join(differ[:6])}). Set config.model.variant to match it '
          f"(or '{whitebox.FROM_WEIGHTS}').")
  return unet_config, vae_config


def check_caption_encoder(model_config,
                          cross_attention_dim: int | None = None
                          ) -> pathlib.Path:
  """The SD folder whose text encoder makes sd_context='caption' contexts.

  Args:
    model_config: config.model (reads init_from).
    cross_attention_dim: when given, the text encoder's width must be it.

  Raises:
    ValueError: init_from is empty, or the text encoder's width is not
      `cross_attention_dim`.
    FileNotFoundError: the folder has no text_encoder/ or tokenizer/.
  """
  caption = whitebox.CAPTION
  if not model_config.init_from:
    raise ValueError(
        f"config.model.sd_context='{caption}' runs the SD folder's text "
        "encoder on each example's prompt, but config.model.init_from is "
        'empty. Set it to a diffusers SD folder with text_encoder/ and '
        'tokenizer/.')
  root = pathlib.Path(model_config.init_from)
  missing = [sub for sub in ('text_encoder', 'tokenizer')
             if not (root / sub).is_dir()]
  if missing:
    raise FileNotFoundError(
        f"config.model.sd_context='{caption}' needs the SD text encoder, "
        f'but config.model.init_from={str(root)!r} has no '
        f'{"/, ".join(missing)}/ subfolder. Use a full diffusers SD folder '
        "(StableDiffusionPipeline.save_pretrained), or another sd_context.")
  if cross_attention_dim is None:
    return root
  width = clip_text_weights.read_config(root / 'text_encoder').width
  if width != cross_attention_dim:
    raise ValueError(
        f'{root}/text_encoder makes {width}-d contexts but the U-Net '
        f'attends to {cross_attention_dim}-d ones (cross_attention_dim); are '
        'they from the same model?')
  return root


def load_context(model_config,
                 unet_config: sd_unet.UNetConfig) -> np.ndarray | None:
  """The U-Net's cross-attention context [T, D] named by config.model.

  None for sd_context='caption': the context is then an input of each call.
  """
  kind = model_config.get('sd_context', 'empty')
  dim = unet_config.cross_attention_dim
  if kind == whitebox.CAPTION:
    if not model_config.get('sd_caption_contexts', ''):
      check_caption_encoder(model_config, dim)
    return None
  if kind == 'empty':
    if not model_config.init_from:
      raise ValueError(
          "config.model.sd_context='empty' runs the SD folder's text encoder "
          'on the empty prompt, but config.model.init_from is empty. Set it, '
          "or use sd_context='file' with config.model.sd_context_path.")
    context = np.asarray(sd_context.empty_prompt_context(
        model_config.init_from))
    where = f'the empty-prompt context of {model_config.init_from}'
  elif kind == 'file':
    path = model_config.get('sd_context_path', '')
    if not path:
      raise ValueError("config.model.sd_context='file' needs "
                       'config.model.sd_context_path (a .npy [T, D]).')
    try:
      context = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f'config.model.sd_context_path={path!r}: not a '
                       f'readable .npy ({type(e).__name__}: {e}).') from e
    where = path
  elif kind == 'zeros':
    context = np.zeros((whitebox.CONTEXT_LENGTH, dim), np.float32)
    where = 'zeros'
  else:
    raise ValueError(f'config.model.sd_context={kind!r}; expected one of '
                     f'{whitebox.CONTEXT_KINDS}.')
  if context.ndim == 3 and context.shape[0] == 1:
    context = context[0]
  if context.ndim != 2 or context.shape[1] != dim:
    raise ValueError(f'{where}: context of shape {context.shape}; the U-Net '
                     f'needs [T, {dim}] (its cross_attention_dim).')
  if not np.all(np.isfinite(context)):
    raise ValueError(f'{where}: the context has non-finite values.')
  return context.astype(np.float32)


def load_sd_params(model_config) -> dict[str, Any]:
  """{'vae': ..., 'unet': ...} params (numpy) from `config.model.init_from`."""
  root = check_sd_folder(model_config.init_from)
  _, vae_params = sd.load_vae_encoder(root)
  _, unet_params = sd.load_unet_encoder(root)
  return {'vae': vae_params, 'unet': unet_params}
