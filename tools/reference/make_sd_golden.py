"""Writes tiny diffusers SD U-Nets and a VAE, and their outputs, for tests.

Runs in the reference environment only (torch, diffusers; see setup_env.sh),
never in the project's .venv:

  bash tools/reference/setup_env.sh
  HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/reference/make_sd_golden.py

Nothing is downloaded: every model is random-initialised (fixed seeds) and
every parameter gets extra noise, so that GroupNorm/LayerNorm scales and
biases are not their trivial init values and a swapped norm or projection in
the mapping table shows up in the outputs. The weights are stored in float16
(like the released `fp16` variants, and to keep the fixtures small); the
recorded outputs are computed in float32 from exactly those float16 values.
Written (each folder as `save_pretrained(safe_serialization=True)` writes it):

  tests/golden/tiny_sd/unet/    UNet2DConditionModel, SD 1.x style:
      block_out_channels (16, 32), layers_per_block 1,
      ('CrossAttnDownBlock2D', 'DownBlock2D'), cross_attention_dim 32,
      attention_head_dim 8 (which diffusers reads as 8 HEADS: head dims 2
      and 4), conv proj_in/proj_out, norm_num_groups 8.
  tests/golden/tiny_sd/vae/     AutoencoderKL: block_out_channels (16, 32),
      layers_per_block 1, latent_channels 4, norm_num_groups 8, sample 32.
  tests/golden/tiny_sd2/unet/   UNet2DConditionModel, SD 2.x style:
      use_linear_projection, attention_head_dim (2, 4) (heads per block:
      head dim 8 everywhere), cross_attention_dim 48, layers_per_block 2,
      freq_shift 1, flip_sin_to_cos False (so both time-embedding options
      are covered).
  tests/golden/sd_golden.npz:
    vae_images          float32 [2, 3, 32, 32] in [-1, 1] (NCHW, as fed)
    vae_mean, vae_logvar  float32 [2, 4, 16, 16]: latent_dist.mean / .logvar
    vae_scaling_factor  float
    {sd1,sd2}_latents   float32 [2, 4, 8, 8] (NCHW)
    {sd1,sd2}_context   float32 [2, 5, cross_attention_dim]
    {sd1,sd2}_timesteps_{a,b}  int64 [2]: a = [0, 0], b = [999, 417]
    {sd1,sd2}_{a,b}_down_blocks_{i}  float32 NCHW: hidden states out of
        down_blocks[i] (after its downsampler, if any)
    {sd1,sd2}_{a,b}_mid_block  float32 NCHW: mid_block output
    {sd15_unet,sd21_unet,sd_vae}_config_json  str: config.json that
        diffusers writes for the full-size SD 1.5 / SD 2.1 U-Net and the SD
        VAE (built from the released config.json values in FULL_SIZE)
    {sd15_unet,sd21_unet,sd_vae}_shapes_json  str: {key: shape} of those
        models' state dicts (built on the meta device: no weights exist)
    versions_json  str, versions of the packages that produced it
"""

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform

os.environ.setdefault('HF_HUB_OFFLINE', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import diffusers
import numpy as np
import torch

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_DEFAULT_OUT = _REPO_ROOT / 'tests' / 'golden'

UNET_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
UNET_SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    layers_per_block=2,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=48, attention_head_dim=(2, 4), norm_num_groups=8,
    use_linear_projection=True, upcast_attention=True, freq_shift=1,
    flip_sin_to_cos=False)
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32),
    down_block_types=('DownEncoderBlock2D',) * 2,
    up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=32)
# The released config.json values that shape the models
# (runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1).
_SD_DOWN = ['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D']
_SD_UP = ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3
SD15_UNET = dict(
    act_fn='silu', attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=_SD_DOWN, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32,
    out_channels=4, sample_size=64, up_block_types=_SD_UP)
SD21_UNET = dict(
    SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    dual_cross_attention=False, num_class_embeds=None,
    only_cross_attention=False, sample_size=96, upcast_attention=True,
    use_linear_projection=True)
SD_VAE = dict(
    act_fn='silu', block_out_channels=[128, 256, 512, 512],
    down_block_types=['DownEncoderBlock2D'] * 4, in_channels=3,
    latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
    sample_size=512, up_block_types=['UpDecoderBlock2D'] * 4)
FULL_SIZE = {
    'sd15_unet': ('UNet2DConditionModel', SD15_UNET),
    'sd21_unet': ('UNet2DConditionModel', SD21_UNET),
    'sd_vae': ('AutoencoderKL', SD_VAE),
}
BATCH = 2
CONTEXT_TOKENS = 5
NOISE = 0.05
TIMESTEPS = {'a': [0, 0], 'b': [999, 417]}


def _versions() -> dict[str, str]:
  names = ('torch', 'diffusers', 'safetensors', 'numpy')
  versions = {name: importlib.metadata.version(name) for name in names}
  versions['python'] = platform.python_version()
  return versions


def _noisy_fp16(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Adds noise to every param, rounds it to float16, returns the fp32 model."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, param in sorted(model.named_parameters()):
      param.add_(NOISE * torch.randn(param.shape, generator=generator))
      param.copy_(param.half().float())
  return model.eval()


def _save_fp16(model: torch.nn.Module, out_dir: pathlib.Path) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  for old in out_dir.iterdir():
    old.unlink()
  model.half().save_pretrained(str(out_dir), safe_serialization=True)
  model.float()
  size = sum(p.stat().st_size for p in out_dir.iterdir()) / 1024
  print(f'Wrote {out_dir} ({size:.1f} KiB): {sorted(os.listdir(out_dir))}')


def _unet_stages(unet, latents, timesteps, context) -> dict[str, np.ndarray]:
  """Each down block's and the mid block's output, via forward hooks."""
  stages = {}

  def hook(name):
    def record(module, inputs, output):
      del module, inputs
      # Down blocks return (hidden_states, res_samples); the mid block a tensor.
      hidden = output[0] if isinstance(output, tuple) else output
      stages[name] = hidden.detach().numpy().copy()
    return record

  handles = [block.register_forward_hook(hook(f'down_blocks_{i}'))
             for i, block in enumerate(unet.down_blocks)]
  handles.append(unet.mid_block.register_forward_hook(hook('mid_block')))
  with torch.no_grad():
    unet(torch.from_numpy(latents), torch.from_numpy(timesteps),
         encoder_hidden_states=torch.from_numpy(context))
  for handle in handles:
    handle.remove()
  return stages


def _make_unet(name, config, seed, out_dir, rng, golden) -> None:
  torch.manual_seed(seed)
  unet = _noisy_fp16(diffusers.UNet2DConditionModel(**config), seed + 1)
  _save_fp16(unet, out_dir)
  latents = rng.standard_normal(
      (BATCH, config['in_channels'], config['sample_size'],
       config['sample_size'])).astype(np.float32)
  context = rng.standard_normal(
      (BATCH, CONTEXT_TOKENS, config['cross_attention_dim'])).astype(
          np.float32)
  golden[f'{name}_latents'] = latents
  golden[f'{name}_context'] = context
  for case, timesteps in TIMESTEPS.items():
    timesteps = np.asarray(timesteps, np.int64)
    golden[f'{name}_timesteps_{case}'] = timesteps
    for stage, value in _unet_stages(unet, latents, timesteps,
                                     context).items():
      golden[f'{name}_{case}_{stage}'] = value
      print(f'{name} {case} {stage}: {value.shape}, '
            f'max |x| {np.abs(value).max():.3g}')


def _full_size_layouts(golden) -> None:
  """Config and state-dict shapes of the full-size models (meta device)."""
  for name, (class_name, config) in FULL_SIZE.items():
    with torch.device('meta'):
      model = getattr(diffusers, class_name)(**config)
    shapes = {key: list(value.shape)
              for key, value in model.state_dict().items()}
    golden[f'{name}_config_json'] = np.array(model.to_json_string())
    golden[f'{name}_shapes_json'] = np.array(json.dumps(shapes))
    print(f'{name}: {len(shapes)} keys')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=_DEFAULT_OUT)
  args = parser.parse_args()
  torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  golden = {}

  _make_unet('sd1', UNET_SD1, 0, args.out / 'tiny_sd' / 'unet', rng, golden)
  _make_unet('sd2', UNET_SD2, 10, args.out / 'tiny_sd2' / 'unet', rng,
             golden)

  torch.manual_seed(20)
  vae = _noisy_fp16(diffusers.AutoencoderKL(**VAE), 21)
  _save_fp16(vae, args.out / 'tiny_sd' / 'vae')
  images = rng.uniform(-1, 1, (BATCH, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(images)).latent_dist
  golden['vae_images'] = images
  golden['vae_mean'] = dist.mean.numpy()
  golden['vae_logvar'] = dist.logvar.numpy()
  golden['vae_scaling_factor'] = np.float64(vae.config.scaling_factor)
  print(f'vae mean {dist.mean.shape}, max |x| {dist.mean.abs().max():.3g}')

  _full_size_layouts(golden)
  versions = _versions()
  golden['versions_json'] = np.array(json.dumps(versions, sort_keys=True))
  path = args.out / 'sd_golden.npz'
  np.savez_compressed(path, **golden)
  print(f'Wrote {path} ({path.stat().st_size / 1024:.1f} KiB): '
        f'{sorted(golden)}')
  print(json.dumps(versions, sort_keys=True))


if __name__ == '__main__':
  main()
