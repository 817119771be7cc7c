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


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """DiffusionDB + pretrained CLIP config for `arg` (see the module doc)."""
  values = common.parse_arg(arg, _KEYS, 'configs/diffusiondb_clip.py')
  variant = values.get('variant', 'L/14')
  mode = values.get('mode', 'mlp')
  tiny = values.get('tiny', '0') == '1'
  if variant not in _VARIANTS and not tiny:
    raise ValueError(f'configs/diffusiondb_clip.py: variant={variant!r}; '
                     f'expected one of {_VARIANTS}.')
  if mode not in _MODES:
    raise ValueError(f'configs/diffusiondb_clip.py: mode={mode!r}; expected '
                     f'one of {_MODES}.')

  dataset = common.real_dataset(values, 'configs/diffusiondb_clip.py')

  config = common.get_base_config()
  data = config.data
  common.set_real_data(data, values, dataset)
  data.image_size = 256  # Stored size; the model's input is input_size.
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
