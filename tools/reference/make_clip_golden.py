"""Writes tiny Hugging Face CLIP checkpoints and their outputs for tests.

Runs in the reference environment only (torch, transformers; see
setup_env.sh), never in the project's .venv:

  bash tools/reference/setup_env.sh
  HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/reference/make_clip_golden.py

Nothing is downloaded: both models are random-initialised (fixed seeds) and
every parameter gets extra noise, so that LayerNorm scales, biases and the
class token are not their trivial init values and a mix-up in the mapping
table shows up in the outputs. Written:

  tests/golden/tiny_clip_vision/   CLIPVisionModelWithProjection
      (config.json, model.safetensors): hidden 32, 2 layers, 2 heads,
      MLP 64, patch 8, image 32, projection 16, quick_gelu, eps 1e-5
      (the shape of the project's 'tiny' ViT variant).
  tests/golden/tiny_clip_full/     CLIPModel with a tiny text half: vision
      hidden 32, 2 layers, patch 8, image 32, gelu, eps 1e-6; projection 24
      at the top level of config.json (vision_config keeps the default 512).
  tests/golden/clip_golden.npz:
    pixel_values_32 / _48 / _24  float32 [N, 3, S, S], as fed to HF (NCHW)
    vision_pooler_output_{32,48,24}, vision_image_embeds_{32,48,24}
        CLIPVisionModelWithProjection outputs (48/24 px with
        interpolate_pos_encoding=True)
    full_pooler_output_{32,48}, full_image_embeds_{32,48}   CLIPModel's
        vision_model pooler_output and visual_projection of it
    vision_pos_embed_48 / _24    [1 + g*g, D] HF interpolate_pos_encoding
        of the vision model's position embeddings for 48 / 24 px
    bare_vision_model_keys  str [K], the keys transformers'
        `CLIPVisionModel.save_pretrained` writes for the same tower
    versions_json  str, versions of the packages that produced it
"""

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import safetensors
import torch
import transformers

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_DEFAULT_OUT = _REPO_ROOT / 'tests' / 'golden'

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, patch_size=8, image_size=32,
              projection_dim=16, hidden_act='quick_gelu', layer_norm_eps=1e-5)
FULL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, patch_size=8, image_size=32,
                   hidden_act='gelu', layer_norm_eps=1e-6)
FULL_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=8, bos_token_id=0, pad_token_id=1,
                 eos_token_id=2)
FULL_PROJECTION_DIM = 24
NOISE = 0.05


def _versions() -> dict[str, str]:
  names = ('torch', 'transformers', 'safetensors', 'numpy')
  versions = {name: importlib.metadata.version(name) for name in names}
  versions['python'] = platform.python_version()
  return versions


def _add_noise(model: torch.nn.Module, seed: int) -> None:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, param in sorted(model.named_parameters()):
      param.add_(NOISE * torch.randn(param.shape, generator=generator))


def _save(model: torch.nn.Module, out_dir: pathlib.Path) -> list[str]:
  out_dir.mkdir(parents=True, exist_ok=True)
  for old in out_dir.iterdir():
    old.unlink()
  model.save_pretrained(str(out_dir), safe_serialization=True)
  with safetensors.safe_open(str(out_dir / 'model.safetensors'), 'np') as f:
    keys = sorted(f.keys())
  size = sum(p.stat().st_size for p in out_dir.iterdir()) / 1024
  print(f'Wrote {out_dir} ({size:.1f} KiB): {sorted(os.listdir(out_dir))}, '
        f'{len(keys)} keys, e.g. {keys[:2]}')
  return keys


def _pos_embed(embeddings: torch.nn.Module, size: int) -> np.ndarray:
  """HF's interpolated position embeddings for a `size` px input."""
  grid = size // embeddings.patch_size
  dummy = torch.zeros(1, 1 + grid * grid, embeddings.embed_dim)
  return embeddings.interpolate_pos_encoding(dummy, size, size)[0].numpy()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=_DEFAULT_OUT)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  pixels = {
      32: rng.standard_normal((3, 3, 32, 32)).astype(np.float32),
      48: rng.standard_normal((2, 3, 48, 48)).astype(np.float32),
      24: rng.standard_normal((2, 3, 24, 24)).astype(np.float32),
  }
  golden = {f'pixel_values_{s}': x for s, x in pixels.items()}

  # Vision tower with projection.
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(**VISION)
  model = transformers.CLIPVisionModelWithProjection(config).eval()
  _add_noise(model, seed=1)
  _save(model, args.out / 'tiny_clip_vision')
  with torch.no_grad():
    for size, x in pixels.items():
      out = model(pixel_values=torch.from_numpy(x),
                  interpolate_pos_encoding=size != VISION['image_size'])
      tower = model.vision_model(pixel_values=torch.from_numpy(x),
                                 interpolate_pos_encoding=size != 32)
      golden[f'vision_image_embeds_{size}'] = out.image_embeds.numpy()
      golden[f'vision_pooler_output_{size}'] = tower.pooler_output.numpy()
    for size in (48, 24):
      golden[f'vision_pos_embed_{size}'] = _pos_embed(
          model.vision_model.embeddings, size)
  # What transformers writes for a bare CLIPVisionModel of the same tower.
  with tempfile.TemporaryDirectory() as tmp:
    bare_keys = _save(model.vision_model, pathlib.Path(tmp) / 'bare')
  golden['bare_vision_model_keys'] = np.array(bare_keys)

  # Full CLIP model (text half included, to check the full key layout).
  torch.manual_seed(2)
  config = transformers.CLIPConfig(text_config=FULL_TEXT,
                                   vision_config=FULL_VISION,
                                   projection_dim=FULL_PROJECTION_DIM)
  full = transformers.CLIPModel(config).eval()
  _add_noise(full, seed=3)
  _save(full, args.out / 'tiny_clip_full')
  with torch.no_grad():
    for size in (32, 48):
      tower = full.vision_model(pixel_values=torch.from_numpy(pixels[size]),
                                interpolate_pos_encoding=size != 32)
      golden[f'full_pooler_output_{size}'] = tower.pooler_output.numpy()
      golden[f'full_image_embeds_{size}'] = full.visual_projection(
          tower.pooler_output).numpy()

  versions = _versions()
  golden['versions_json'] = np.array(json.dumps(versions, sort_keys=True))
  path = args.out / 'clip_golden.npz'
  np.savez_compressed(path, **golden)
  print(f'Wrote {path} ({path.stat().st_size / 1024:.1f} KiB): '
        f'{sorted(golden)}')
  print(json.dumps(versions, sort_keys=True))


if __name__ == '__main__':
  main()
