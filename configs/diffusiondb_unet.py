r"""The paper's white-box model on DiffusionDB: a fine-tuned SD U-Net encoder.

  python -m reverse_sd.main --workdir=runs/ddb_unet15 \
      --config=configs/diffusiondb_unet.py:sd=1.5,data_dir=/data/tfds,manual_dir=/data/diffusiondb,weights=/models/stable-diffusion-v1-5

The generator's VAE encodes each image once (its latents are cached beside
the data: `model.frozen_features`); the U-Net's down blocks and mid block
read the clean latent at timestep 0 with the empty prompt's text embedding
as cross-attention context; the mid block's output, max-pooled over space,
goes through a Dense layer to the 384-d prompt embedding. The U-Net trains
at a tenth of the head's learning rate; the VAE never trains.

`arg` is a comma-separated list of key=value:
  sd          1.5 | 2.1 (default 1.5): must match the weights.
  weights     a local diffusers Stable Diffusion folder (unet/, vae/ and,
              for the empty-prompt context, text_encoder/ + tokenizer/;
              safetensors weights).
  context     empty (default: the SD text encoder on the empty prompt),
              zeros, caption, or the path of a .npy [77, D] context.
              caption: per example, the SD text encoder on that example's
              own prompt (computed once per split and cached beside the
              data; needs text_encoder/ + tokenizer/ in weights). It gives
              the model the very prompt it is asked to predict, so it is an
              upper-bound / analysis setting, not a reverse model; such a
              run cannot predict new images (reverse_sd.predict refuses).
  size        image side in pixels, a multiple of 64 (default 256; SD was
              trained at 512 (1.5) / 768 (2.1)).
  data_dir    where the built TFDS data set lives (or is built).
  manual_dir  the downloaded DiffusionDB folder (see README: Real data).
  parts       DiffusionDB parts to use, e.g. 1-200 (default 1-10).
  collection  2m (PNG parts) or large (WebP parts); default 2m.
  dataset     diffusiondb (default) or image_folder (see README).
  prompts     image_folder only: the prompt list file name in manual_dir.
  tiny        1: tiny shapes for tests (tests/golden/tiny_sd unless weights
              is given, 32 px images, few steps).

Every value can be overridden on the command line as usual
(`--config.model.sd_timestep=...`, `--config.model.sd_noise=...`).
"""

import pathlib

import ml_collections

from configs import common

_SD_VARIANTS = {'1.5': 'sd1.5', '2.1': 'sd2.1'}
_KEYS = ('sd', 'weights', 'context', 'size', 'data_dir', 'manual_dir',
         'parts', 'collection', 'dataset', 'prompts', 'tiny')
_TINY_SD = pathlib.Path(__file__).resolve().parent.parent / (
    'tests/golden/tiny_sd')
# VAE (8) x U-Net (8) downsampling of SD 1.x / 2.x.
_SIZE_MULTIPLE = 64


def _set_context(model: ml_collections.ConfigDict, context: str) -> None:
  if context in ('empty', 'zeros', 'caption'):
    model.sd_context = context
  else:
    model.sd_context = 'file'
    model.sd_context_path = context


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """DiffusionDB + white-box SD U-Net config for `arg` (see the module doc)."""
  values = common.parse_arg(arg, _KEYS, 'configs/diffusiondb_unet.py')
  sd = values.get('sd', '1.5')
  tiny = values.get('tiny', '0') == '1'
  if sd not in _SD_VARIANTS:
    raise ValueError(f'configs/diffusiondb_unet.py: sd={sd!r}; expected one '
                     f'of {tuple(_SD_VARIANTS)}.')
  dataset = common.real_dataset(values, 'configs/diffusiondb_unet.py')
  size = int(values.get('size', '256'))
  if size % _SIZE_MULTIPLE and not tiny:
    raise ValueError(f'configs/diffusiondb_unet.py: size={size} is not a '
                     f'multiple of {_SIZE_MULTIPLE}.')

  config = common.get_base_config()
  data = config.data
  common.set_real_data(data, values, dataset)
  data.image_size = size  # Stored size, fed as stored (input_size 0).
  data.input_size = 0

  model = config.model
  model.backbone = 'sd_unet'
  model.variant = _SD_VARIANTS[sd]
  model.init_from = values.get('weights', '')
  _set_context(model, values.get('context', 'empty'))
  model.sd_timestep = 0
  model.sd_noise = 0.0
  model.image_mean = (0.5, 0.5, 0.5)  # The VAE reads images in [-1, 1].
  model.image_std = (0.5, 0.5, 0.5)
  model.head_hidden = ()  # Max-pooled mid block -> Dense -> 384.
  model.frozen_features = True  # VAE latents, computed once and cached.
  model.dtype = 'bfloat16'
  config.optim.lr = 1e-4  # The head's; the U-Net trains at 1e-5.
  config.optim.param_groups = (('^backbone/unet/', 0.1),)
  config.optim.weight_decay = 0.01
  config.train.num_epochs = 5.0
  config.train.batch_size = 64
  config.train.eval_every_steps = 2000
  config.train.checkpoint_every_steps = 1000
  config.eval.batch_size = 128
  config.eval.splits = ('validation', 'test')

  if tiny:
    model.variant = 'from_weights'
    model.init_from = values.get('weights', str(_TINY_SD))
    data.image_size = 40
    data.input_size = 32  # Resize + centre crop to the tiny SD's multiple.
    data.validation_fraction = 0.2
    data.test_fraction = 0.2
    model.dtype = 'float32'
    config.train.batch_size = 8
    config.train.num_epochs = 2.0
    config.train.log_every_steps = 2
    config.train.eval_every_steps = 100
    config.train.checkpoint_every_steps = 4
    config.eval.batch_size = 8
    config.text.batch_size = 16
  config.lock()
  return config
