r"""The paper's black-box model on DiffusionDB: a pretrained CLIP vision tower.

  python -m reverse_sd.main --workdir=runs/ddb_h14 \
      --config=configs/diffusiondb_clip.py:variant=H/14,mode=mlp,data_dir=/data/tfds,manual_dir=/data/diffusiondb,weights=/models/clip-vit-h-14

`arg` is a comma-separated list of key=value:
  variant     B/16 | L/14 | H/14 (default L/14): must match the weights.
  mode        mlp (default): the paper's frozen CLIP tower (image embeddings,
              computed once and cached) and an MLP head
              (proj -> 8192 -> 8192 -> 384);
              finetune: the whole tower trains (the Kaggle winners' choice),
              at a tenth of the head's learning rate.
  data_dir    where the built TFDS data set lives (or is built).
  manual_dir  the downloaded DiffusionDB folder (see README: Real data).
  weights     a local Hugging Face CLIP folder (config.json +
              model.safetensors).
  parts       DiffusionDB parts to use, e.g. 1-200 (default 1-10).
  collection  2m (PNG parts) or large (WebP parts); default 2m.
  dataset     diffusiondb (default) or image_folder (a folder of images and
              prompts.csv `imgId,prompt` or prompts.jsonl; see README).
  prompts     image_folder only: the prompt list file name in manual_dir.
  tiny        1: tiny shapes for tests (a tiny CLIP checkpoint, few steps).

Every value can be overridden on the command line as usual
(`--config.optim.lr=...`).
"""

import ml_collections

from configs import common

_VARIANTS = ('B/16', 'L/14', 'H/14')
_MODES = ('mlp', 'finetune')
_KEYS = ('variant', 'mode', 'data_dir', 'manual_dir', 'weights', 'parts',
         'collection', 'dataset', 'prompts', 'tiny')
_DATASETS = ('diffusiondb', 'image_folder')


def _parse(arg: str) -> dict[str, str]:
  values = {}
  for item in filter(None, (part.strip() for part in arg.split(','))):
    if '=' not in item:
      raise ValueError(f'configs/diffusiondb_clip.py: {item!r} is not '
                       f'key=value; keys are {_KEYS}.')
    key, value = item.split('=', 1)
    if key not in _KEYS:
      raise ValueError(f'configs/diffusiondb_clip.py: unknown key {key!r}; '
                       f'keys are {_KEYS}.')
    values[key] = value
  return values


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """DiffusionDB + pretrained CLIP config for `arg` (see the module doc)."""
  values = _parse(arg)
  variant = values.get('variant', 'L/14')
  mode = values.get('mode', 'mlp')
  tiny = values.get('tiny', '0') == '1'
  if variant not in _VARIANTS and not tiny:
    raise ValueError(f'configs/diffusiondb_clip.py: variant={variant!r}; '
                     f'expected one of {_VARIANTS}.')
  if mode not in _MODES:
    raise ValueError(f'configs/diffusiondb_clip.py: mode={mode!r}; expected '
                     f'one of {_MODES}.')

  dataset = values.get('dataset', 'diffusiondb')
  if dataset not in _DATASETS:
    raise ValueError(f'configs/diffusiondb_clip.py: dataset={dataset!r}; '
                     f'expected one of {_DATASETS}.')

  config = common.get_base_config()
  data = config.data
  data.name = dataset
  data.data_dir = values.get('data_dir', '')
  data.manual_dir = values.get('manual_dir', '')
  if dataset == 'diffusiondb':
    data.collection = values.get('collection', '2m')
    data.parts = values.get('parts', '1-10')
    data.max_image_nsfw = -1.0  # < 0: no filter.
    data.max_prompt_nsfw = -1.0
  else:
    data.prompts = values.get('prompts', '')  # '': prompts.csv or .jsonl.
  data.image_size = 256  # Stored size; the model's input is input_size.
  data.resize_mode = 'center_crop'
  data.image_format = 'png'  # 'jpeg' stores 2M images in ~40 GB, not ~250.
  data.num_workers = 4  # Decode threads of the build.
  data.validation_fraction = 0.02
  data.test_fraction = 0.02
  data.split_seed = 0
  data.dedup = True
  # CLIP preprocessing at read time: shorter side to input_size, centre crop.
  data.input_size = 224

  model = config.model
  model.backbone = 'vit'
  model.variant = 'tiny' if tiny else variant
  model.init_from = values.get('weights', '')
  model.vit_projection = True  # CLIP image embeddings (512/768/1024-d).
  if mode == 'mlp':
    model.head_hidden = (8192, 8192)
    model.frozen_features = True
    config.optim.lr = 1e-4
    config.train.num_epochs = 20.0
  else:
    model.head_hidden = ()
    model.frozen_features = False
    config.optim.lr = 1e-4
    config.optim.param_groups = (('^backbone/', 0.1),)
    config.optim.weight_decay = 0.05
    config.train.num_epochs = 5.0
  config.model.dtype = 'bfloat16'
  config.train.batch_size = 256
  config.train.eval_every_steps = 2000
  config.train.checkpoint_every_steps = 1000
  config.eval.splits = ('validation', 'test')

  if tiny:
    data.image_size = 40
    data.input_size = 32
    data.validation_fraction = 0.2
    data.test_fraction = 0.2
    model.head_hidden = (64,) if mode == 'mlp' else ()
    config.model.dtype = 'float32'
    config.train.batch_size = 8
    config.train.num_epochs = 2.0
    config.train.log_every_steps = 2
    config.train.eval_every_steps = 100
    config.train.checkpoint_every_steps = 4
    config.eval.batch_size = 8
    config.text.batch_size = 16
  config.lock()
  return config
