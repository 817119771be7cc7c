"""Pretrained backbone weights from local checkpoints (`config.model.init_from`).
"""

from typing import Any

import jax
import numpy as np

from reverse_sd import sharding


def load_backbone_params(model_config, image_shape: tuple[int, ...]) -> Any:
  """The backbone's params (numpy) converted from `model_config.init_from`.

  'vit': a Hugging Face CLIP folder; the checkpoint's shape must be the
  configured variant's; position embeddings are interpolated to the input
  size. 'sd_unet': a diffusers Stable Diffusion folder; its VAE encoder and
  U-Net encoder ({'vae': ..., 'unet': ...}; the model's shapes were read from
  the same folder).
  """
  path = model_config.init_from
  if model_config.backbone == 'sd_unet':
    # Imported here: only white-box runs need the SD converters.
    from reverse_sd.models import whitebox  # pylint: disable=g-import-not-at-top
    return whitebox.load_pretrained(model_config)
  if model_config.backbone != 'vit':
    raise ValueError(
        f'config.model.init_from={path!r}: pretrained weights load into the '
        f"'vit' backbone (a Hugging Face CLIP folder) or the 'sd_unet' "
        f'backbone (a diffusers SD folder) only, not '
        f'{model_config.backbone!r}.')
  # Imported here: only runs that start from a checkpoint need it.
  from reverse_sd.convert import clip  # pylint: disable=g-import-not-at-top
  from reverse_sd.models import vit  # pylint: disable=g-import-not-at-top
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
