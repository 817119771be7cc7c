r"""Train-step and inference throughput: reverse_sd (JAX) against PyTorch.

  .venv/bin/python benchmarks/train_step.py                # the CPU tables
  .venv/bin/python benchmarks/train_step.py --quick        # smoke: seconds
  .venv/bin/python benchmarks/train_step.py --cases=vit_b16:256:512 \
      --frameworks=jax --dtype=bfloat16 --matmul_size=8192  # an accelerator

Each measurement runs in its own subprocess, interleaved A B C A B C per
model case (JAX, PyTorch eager, PyTorch torch.compile; `--rounds` times), all
pinned to the same cores with the same thread count and the same glibc
allocator settings (`reverse_sd/ops/cpu/tuning.py`: freed blocks stay mapped;
`REVERSE_SD_MALLOC_DEFAULTS=0` gives every worker glibc's defaults, JAX
included). The `faults/step` column is a worker's page faults per timed
train step (memory the kernel mapped in and zeroed). A worker builds the
model, warms up, then times `--steps` steps one by one (each blocks until
done) and reports the median; the table shows, per framework, the median
over rounds.

JAX side: the project's own code, as the trainer uses it:
`pretrained.create_model` on `configs/synthetic.py` with the case's
backbone, `optim.create_optimizer` (AdamW, clipping, warm-up + cosine),
`state.create_train_state` on `sharding.make_mesh` (all devices),
`train.make_train_step` (cosine + Huber) and `evaluate.make_predict_step`,
on random uint8 images and random unit targets. Compile time is
lower + compile of the step; FLOPs per image are XLA's cost analysis of the
compiled step divided by the per-device batch.

PyTorch side (`benchmarks/torch_reference.py`, run by `--torch_python`, the
reference environment): the same architecture and loss written in torch (a
ConvNet module matching `models/convnet.py`; for ViT, transformers'
CLIPVisionModel with the same shapes), AdamW with the same decay mask and
gradient clipping. `--verify` (default on) first loads the JAX model's
initial parameters into the torch model and compares the outputs on the same
images, so the two sides are shown to compute the same function.

MFU: achieved FLOP/s (XLA's count for both frameworks, so like for like)
over a matmul peak measured here (`--matmul_size`^3 in JAX, median, measured
before and after the tables; the larger is used).

Writes `--output` (default benchmarks/results/train_step.json): machine,
date, commands, per-round raw times, summaries and ratios.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable-next=wrong-import-position
from benchmarks import common

FRAMEWORKS = ('jax', 'torch_eager', 'torch_compile')
DEFAULT_OUTPUT = 'benchmarks/results/train_step.json'
# reverse_sd.ops.conv.CHOICES and reverse_sd.ops.attention.CHOICES, spelled
# out so that the driver parses its flags without importing JAX.
CONV_CHOICES = ('auto', 'xla', 'cpu_kernel')
ATTENTION_CHOICES = ('auto', 'xla', 'cudnn', 'pallas_tpu', 'pallas_gpu')


# ---------------------------------------------------------------------------
# The case spec: everything both workers need, from the project's config.
# ---------------------------------------------------------------------------


def make_spec(case: dict[str, Any], args) -> dict[str, Any]:
  """The JSON-able description of one case that both workers read."""
  # pylint: disable=g-import-not-at-top
  from configs import synthetic
  from reverse_sd.models import reverse_model
  config = synthetic.get_config('')
  if case['backbone'] == reverse_model.WHITEBOX:
    unet_config, _ = _whitebox_configs(case)
    shape = dataclasses.asdict(unet_config)
  else:
    _, variants = reverse_model.BACKBONES[case['backbone']]
    shape = dataclasses.asdict(variants[case['variant']])
  return dict(
      case, dtype=args.dtype, seed=0, embedding_dim=384, shape=shape,
      head_hidden=list(config.model.head_hidden),
      image_mean=list(config.model.image_mean),
      image_std=list(config.model.image_std),
      loss=config.loss.to_dict(),
      optim={k: config.optim[k] for k in ('lr', 'b1', 'b2', 'weight_decay',
                                          'grad_clip_norm')},
      warmup=args.warmup, steps=args.steps, infer_warmup=args.infer_warmup,
      infer_steps=args.infer_steps, threads=args.threads,
      conv=getattr(args, 'conv', 'auto'),
      attention=getattr(args, 'attention', 'auto'),
      micro_batch=getattr(args, 'micro_batch', -1))


def _config_for(spec: dict[str, Any]):
  """configs/synthetic.py with the spec's backbone, variant and dtype.

  The white-box backbone gets an all-zero context of the right width (the
  same compute as the empty-prompt context, without a text encoder).
  """
  # pylint: disable=g-import-not-at-top
  from configs import synthetic
  config = synthetic.get_config('')
  config.model.backbone = spec['backbone']
  config.model.variant = spec['variant']
  config.model.dtype = spec['dtype']
  config.model.conv = spec.get('conv', 'auto')
  config.model.attention = spec.get('attention', 'auto')
  config.eval.micro_batch = spec.get('micro_batch', -1)
  config.vocab.loss_weight = 0.0
  if spec['backbone'] == 'sd_unet':
    config.model.sd_context = 'zeros'
    config.model.init_from = str(REPO / spec['init_from']) if spec.get(
        'init_from') else ''
  return config


def _whitebox_configs(case: dict[str, Any]):
  """(U-Net, VAE) shapes of a white-box case."""
  # pylint: disable=g-import-not-at-top
  from reverse_sd import pretrained
  config = _config_for(dict(case, dtype='float32'))
  return pretrained.read_configs(config.model)


def _model_inputs(spec: dict[str, Any], rng, batch: int) -> dict[str, Any]:
  """Random inputs: uint8 images, or for the white-box backbone the cached
  VAE latents it trains on ([B, H/f, W/f, C], f the VAE's downsampling)."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  images, targets = _random_batch(rng, batch, spec['image_size'])
  if spec['backbone'] != 'sd_unet':
    return {'image': images}, targets
  _, vae_config = _whitebox_configs(spec)
  side = spec['image_size'] // vae_config.downsample_factor
  latents = rng.normal(size=(batch, side, side, vae_config.latent_channels))
  return {'features': latents.astype(np.float32)}, targets


# ---------------------------------------------------------------------------
# JAX workers (run in fresh subprocesses of the main environment).
# ---------------------------------------------------------------------------


def _random_batch(rng, batch: int, image_size: int, dim: int = 384):
  # pylint: disable=g-import-not-at-top
  import numpy as np
  images = rng.integers(0, 256, (batch, image_size, image_size, 3),
                        dtype=np.uint8)
  targets = rng.normal(size=(batch, dim)).astype(np.float32)
  targets /= np.linalg.norm(targets, axis=1, keepdims=True)
  return images, targets


def _flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled computation (None if not reported)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per program.
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else None


# Custom-call targets of a fused attention kernel in compiled HLO text:
# cuDNN's flash attention ('__cudnn$fmha...'), a Pallas GPU (Triton) or TPU
# (Mosaic) kernel.
ATTENTION_CALL_MARKERS = ('__cudnn$fmha', 'triton', 'tpu_custom_call',
                          'mosaic')
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def custom_calls(hlo_text: str) -> dict[str, int]:
  """Custom-call target -> how many calls, in compiled HLO text."""
  counts: dict[str, int] = {}
  for target in _CUSTOM_CALL.findall(hlo_text):
    counts[target] = counts.get(target, 0) + 1
  return counts


def attention_calls(calls: dict[str, int]) -> dict[str, int]:
  """The fused-attention kernels among `custom_calls`' targets."""
  return {target: n for target, n in calls.items()
          if any(m in target.lower() for m in ATTENTION_CALL_MARKERS)}


def _ops_of(model) -> dict[str, str | None]:
  """The implementations the model's ops resolved to (None: no such op
  in this backbone)."""
  backbone = model.backbone
  return {f'{op}_implementation': getattr(getattr(backbone, op, None),
                                          'implementation', None)
          for op in ('attention', 'conv')}


def peak_device_bytes(device) -> int | None:
  """The device allocator's peak (None where it reports none, as on CPU)."""
  try:
    stats = device.memory_stats()
  except (AttributeError, RuntimeError, NotImplementedError):
    return None
  return (stats or {}).get('peak_bytes_in_use')


def _xla_op_flops(spec: dict[str, Any], built: dict[str, Any],
                  state) -> tuple[float | None, float | None]:
  """XLA's FLOP counts of the train and predict steps, computed on the same
  functions written with XLA's own ops.

  XLA's cost analysis counts nothing inside a custom call (the CPU
  convolution kernel, `reverse_sd/ops/cpu/conv.cc`; cuDNN's or Pallas'
  fused attention, `reverse_sd/ops/attention.py`), and a micro-batched
  predict step's loop body once. So the counts come from the step compiled
  with `conv='xla'`, `attention='xla'` and the whole inference batch at
  once: the same function and the same FLOPs.
  """
  # pylint: disable=g-import-not-at-top
  from reverse_sd import evaluate
  from reverse_sd import optim
  from reverse_sd import pretrained
  from reverse_sd import train
  from reverse_sd.models import reverse_model
  config = _config_for(dict(spec, attention='xla', conv='xla',
                            micro_batch=0))
  model = pretrained.create_model(config.model, mesh=built['mesh'])
  _, schedule = optim.create_optimizer(
      config.optim, total_steps=1000,
      extra_groups=reverse_model.frozen_param_groups(config.model))
  step = train.make_train_step(model, config.loss, schedule, built['mesh'],
                               built['shardings'])
  predict = evaluate.make_predict_step(model, built['mesh'],
                                       built['shardings'].params,
                                       micro_batch=0)
  return (_flops(step.lower(state, built['batch']).compile()),
          _flops(predict.lower(state.params,
                               built['infer_batch']).compile()))


def build_jax(spec: dict[str, Any], devices=None) -> dict[str, Any]:
  """The project's model, sharded train state, train and predict steps and
  random batches for `spec`, as the trainer builds them.

  Returns a dict: config, mesh, model, state, shardings, step (jitted,
  state-donating), batch (global), predict (jitted), infer_batch, result
  (the description every worker reports).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from reverse_sd import evaluate
  from reverse_sd import optim
  from reverse_sd import pretrained
  from reverse_sd import sharding
  from reverse_sd import state as state_lib
  from reverse_sd import train
  from reverse_sd.models import reverse_model

  config = _config_for(spec)
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape,
                            devices=devices)
  num_devices = mesh.devices.size
  model = pretrained.create_model(config.model, mesh=mesh)
  # As train.py: a frozen stage (the white-box VAE) is never updated.
  tx, schedule = optim.create_optimizer(
      config.optim, total_steps=1000,
      extra_groups=reverse_model.frozen_param_groups(config.model))
  image_shape = (spec['image_size'], spec['image_size'], 3)
  if spec['backbone'] == reverse_model.WHITEBOX:
    # Parameter shapes do not depend on the image size: initialise small.
    unet_config, vae_config = _whitebox_configs(spec)
    side = vae_config.downsample_factor * unet_config.downsample_factor
    image_shape = (side, side, 3)
  state, shardings = state_lib.create_train_state(
      model, tx, image_shape, jax.random.key(spec['seed']), mesh)
  step = train.make_train_step(model, config.loss, schedule, mesh, shardings)
  rng = np.random.default_rng(spec['seed'])
  inputs, targets = _model_inputs(spec, rng, spec['train_batch'])
  batch = sharding.host_to_global(dict(inputs, embedding=targets), mesh)
  infer_inputs, _ = _model_inputs(spec, rng, spec['infer_batch'])
  result = {'framework': 'jax', 'case': spec['name'], 'dtype': spec['dtype'],
            'jax_version': jax.__version__,
            'backend': jax.default_backend(),
            # The user's.
            'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'micro_batch': config.eval.micro_batch,
            'device_kind': mesh.devices.flat[0].device_kind,
            'num_devices': int(num_devices), 'cores': len(common.cores()),
            'param_count': int(sum(x.size for x in
                                   jax.tree.leaves(state.params))),
            **_ops_of(model)}
  return dict(config=config, mesh=mesh, model=model, state=state,
              shardings=shardings, step=step, batch=batch,
              predict=evaluate.make_predict_step(
                  model, mesh, shardings.params,
                  micro_batch=config.eval.get('micro_batch', -1)),
              infer_batch=sharding.host_to_global(infer_inputs, mesh),
              result=result)


def measure_jax(spec: dict[str, Any], devices=None) -> dict[str, Any]:
  """Train and inference throughput of the project's JAX step for `spec`.

  `devices` (default: all) make the mesh; batches are global.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  built = build_jax(spec, devices)
  state, batch, step = built['state'], built['batch'], built['step']
  num_devices = built['mesh'].devices.size
  result = built['result']

  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  calls = custom_calls(compiled.as_text())
  result['train_custom_calls'] = calls
  result['train_attention_calls'] = attention_calls(calls)
  holder = {'state': state, 'metrics': None}

  def train_once():
    holder['state'], holder['metrics'] = compiled(holder['state'], batch)
    jax.block_until_ready((holder['state'], holder['metrics']))

  counters = {}
  warmup_times, times = common.time_steps(train_once, warmup=spec['warmup'],
                                          steps=spec['steps'],
                                          counters=counters)
  result['train'] = dict(
      common.summarize(times), **counters, batch=spec['train_batch'],
      lower_s=lower_s, compile_s=compile_s, warmup_times_s=warmup_times,
      final_loss=float(holder['metrics'].compute()['loss']))
  result['peak_rss_mb_after_train'] = common.peak_rss_mb()

  predict = built['predict']
  params = holder['state'].params
  infer_batch = built['infer_batch']
  start = time.perf_counter()
  compiled_predict = predict.lower(params, infer_batch).compile()
  infer_compile_s = time.perf_counter() - start
  counters = {}
  warmup_times, times = common.time_steps(
      lambda: jax.block_until_ready(compiled_predict(params, infer_batch)),
      warmup=spec['infer_warmup'], steps=spec['infer_steps'],
      counters=counters)
  result['infer'] = dict(
      common.summarize(times), **counters, batch=spec['infer_batch'],
      compile_s=infer_compile_s, warmup_times_s=warmup_times)
  result['peak_rss_mb'] = common.peak_rss_mb()
  result['peak_device_bytes'] = peak_device_bytes(
      built['mesh'].devices.flat[0])
  # After the peak memory: the FLOP counts compile two more steps.
  train_flops, infer_flops = _xla_op_flops(spec, built, holder['state'])
  result['train'].update(
      flops_per_step=train_flops,
      flops_per_image=(train_flops / (spec['train_batch'] / num_devices)
                       if train_flops else None))
  result['infer']['flops_per_image'] = (
      infer_flops / (spec['infer_batch'] / num_devices)
      if infer_flops else None)
  return result


def measure_matmul(size: int, dtype: str, steps: int = 20) -> dict[str, Any]:
  """Median FLOP/s of a size^3 matmul on JAX's default device."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  _, times = common.time_steps(
      lambda: jax.block_until_ready(matmul(a, b)), warmup=3, steps=steps)
  summary = common.summarize(times)
  return dict(summary, size=size, dtype=dtype, flops=2.0 * size**3,
              flops_per_s=2.0 * size**3 / summary['median_s'],
              device_kind=jax.devices()[0].device_kind,
              backend=jax.default_backend())


def dump_jax_reference(spec: dict[str, Any], path: str) -> dict[str, Any]:
  """Writes the JAX model's initial params, 2 images and its outputs (npz),
  for `torch_reference.py --verify`."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from reverse_sd import pretrained
  from reverse_sd import sharding
  config = _config_for(spec)
  model = pretrained.create_model(config.model)
  images, _ = _random_batch(np.random.default_rng(1), 2, spec['image_size'])
  variables = model.init(jax.random.key(spec['seed']), images)
  out = model.apply(variables, images)
  arrays = {'images': images, 'embedding': np.asarray(out['embedding']),
            'features': np.asarray(out['features'], np.float32)}
  for key_path, value in jax.tree_util.tree_leaves_with_path(
      variables['params']):
    arrays['param/' + sharding.path_str(key_path)] = np.asarray(value)
  np.savez(path, **arrays)
  return {'path': path, 'num_params': len(arrays) - 3}


# ---------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------


def _jax_command(worker: str, **flags) -> list[str]:
  return [sys.executable, str(pathlib.Path(__file__).resolve()),
          f'--worker={worker}'] + [f'--{k}={v}' for k, v in flags.items()]


def _torch_command(args, **flags) -> list[str]:
  return [args.torch_python, str(REPO / 'benchmarks' / 'torch_reference.py')
          ] + [f'--{k}={v}' for k, v in flags.items()]


def _run(command: list[str], args, label: str) -> dict[str, Any]:
  common.log(f'{label}: {" ".join(command[:3])} ...')
  # Every worker on the same `threads` cores: XLA sizes its thread pool by
  # the cores it may use, torch gets set_num_threads(threads).
  result = common.run_worker(command, common.worker_env(threads=args.threads),
                             timeout_s=args.worker_timeout,
                             cpu_list=common.cores()[:args.threads])
  if 'error' in result:
    common.log(f'{label} FAILED ({result["error"]}):\n'
               f'{result.get("stderr_tail", "")[-1500:]}')
  else:
    common.log(f'{label}: done in {result.get("wall_s", 0):.0f} s')
  return result


def _matmul_peak(args, label: str) -> dict[str, Any]:
  return _run(_jax_command('matmul', matmul_size=args.matmul_size,
                           dtype=args.dtype), args, f'matmul peak ({label})')


def _verify(spec: dict[str, Any], args) -> dict[str, Any]:
  """JAX params -> torch model; same outputs on the same images?"""
  # float32 whatever the timed dtype: the comparison is to 1e-4.
  small = dict(spec, train_batch=2, infer_batch=2, dtype='float32')
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'reference.npz')
    dumped = _run(_jax_command('dump', spec=json.dumps(small), dump=path),
                  args, f'{spec["name"]} verify (JAX dump)')
    if 'error' in dumped:
      return dumped
    return _run(_torch_command(args, spec=json.dumps(small), verify=path),
                args, f'{spec["name"]} verify (torch)')


def _images_per_s(run: dict[str, Any], phase: str) -> float | None:
  if 'error' in run or phase not in run or 'error' in run[phase]:
    return None
  return run[phase]['batch'] / run[phase]['median_s']


def _median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def summarize_case(runs: dict[str, list[dict]], peak_flops: float | None
                   ) -> dict[str, dict[str, Any]]:
  """Per framework: medians over rounds, FLOP/s and MFU (XLA's FLOPs)."""
  jax_runs = [r for r in runs.get('jax', []) if 'error' not in r]
  flops_train = _median([r['train']['flops_per_image'] for r in jax_runs])
  flops_infer = _median([r['infer']['flops_per_image'] for r in jax_runs])
  out = {}
  for framework, framework_runs in runs.items():
    train_rates = [_images_per_s(r, 'train') for r in framework_runs]
    infer_rates = [_images_per_s(r, 'infer') for r in framework_runs]
    ok = [r for r in framework_runs if 'error' not in r]
    devices = ok[0].get('num_devices', 1) if ok else 1
    train = _median(train_rates)
    infer = _median(infer_rates)
    summary = {
        'train_images_per_s': train,
        'train_images_per_s_per_device': train / devices if train else None,
        'infer_images_per_s': infer,
        'train_images_per_s_rounds': train_rates,
        'infer_images_per_s_rounds': infer_rates,
        'round_spread': (_spread(train_rates)),
        'compile_s': _median([_compile_s(r) for r in ok]),
        'peak_rss_mb': _median([r.get('peak_rss_mb') for r in ok]),
        'train_minor_faults_per_step': _median(
            [r['train'].get('minor_faults_per_step') for r in ok
             if isinstance(r.get('train'), dict)]),
        'errors': [r['error'] for r in framework_runs if 'error' in r] + [
            r[p]['error'] for r in ok for p in ('train', 'infer')
            if isinstance(r.get(p), dict) and 'error' in r[p]],
        'flops_per_image_train': flops_train,
        'flops_per_image_infer': flops_infer,
    }
    if framework == 'jax' and ok:
      peaks = [r.get('peak_device_bytes') for r in ok]
      summary.update(
          attention=ok[0].get('attention_implementation'),
          conv=ok[0].get('conv_implementation'),
          attention_calls=ok[0].get('train_attention_calls', {}),
          peak_device_gib=(max(peaks) / 2**30 if all(peaks) else None))
    if train and flops_train:
      summary['train_flops_per_s'] = train * flops_train / devices
      if peak_flops:
        summary['train_mfu'] = summary['train_flops_per_s'] / peak_flops
    if infer and flops_infer:
      summary['infer_flops_per_s'] = infer * flops_infer / devices
      if peak_flops:
        summary['infer_mfu'] = summary['infer_flops_per_s'] / peak_flops
    out[framework] = summary
  return out


def _compile_s(run: dict[str, Any]) -> float | None:
  """JAX: lower + compile of the train step. torch: the first step's time
  (eager: allocation and warm-up; torch.compile: tracing and compiling)."""
  train = run.get('train') or {}
  if 'compile_s' in train:
    return train['compile_s']
  warmup = train.get('warmup_times_s') or []
  return warmup[0] if warmup else None


def _spread(values) -> float | None:
  values = [v for v in values if v is not None]
  if len(values) < 2:
    return None
  return (max(values) - min(values)) / statistics.median(values)


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
  """JAX's throughput over each torch variant's (above 1: JAX is faster)."""
  out = {}
  jax_summary = summary.get('jax', {})
  for framework in ('torch_eager', 'torch_compile'):
    if framework not in summary:
      continue
    for phase in ('train', 'infer'):
      ours = jax_summary.get(f'{phase}_images_per_s')
      theirs = summary[framework].get(f'{phase}_images_per_s')
      out[f'{phase}_jax_over_{framework}'] = (ours / theirs if ours and theirs
                                              else None)
  return out


def format_report(cases: dict[str, dict[str, Any]]) -> str:
  """The table of every case and framework, then the JAX/torch ratios."""
  headers = ['case', 'framework', 'train img/s', 'per dev', 'spread',
             'infer img/s', 'compile s', 'peak MB', 'faults/step',
             'GFLOP/img',
             'train GFLOP/s', 'train MFU', 'infer MFU']
  rows, lines = [], []
  for name, case in cases.items():
    for framework, s in case['summary'].items():
      mfu = lambda key, s=s: (f'{100 * s[key]:.1f}%' if s.get(key) is not None
                              else None)
      rows.append([
          name, framework + (' (failed)' if s['errors'] else ''),
          s['train_images_per_s'], s['train_images_per_s_per_device'],
          (f'{100 * s["round_spread"]:.0f}%' if s['round_spread'] is not None
           else None),
          s['infer_images_per_s'], s['compile_s'], s['peak_rss_mb'],
          s['train_minor_faults_per_step'],
          (s['flops_per_image_train'] / 1e9 if s['flops_per_image_train']
           else None),
          (s['train_flops_per_s'] / 1e9 if s.get('train_flops_per_s')
           else None), mfu('train_mfu'), mfu('infer_mfu')])
    jax_summary = case['summary'].get('jax') or {}
    if 'attention' in jax_summary:
      lines.append(f'{name}: jax ops: {describe_ops(jax_summary)}')
    for key, value in case['ratios'].items():
      lines.append(f'{name}: {key} = '
                   f'{f"{value:.2f}x" if value is not None else "-"}')
    verify = case.get('verify')
    if verify:
      detail = (f'error: {verify["error"]}' if 'error' in verify else
                f'max |diff| of the embedding '
                f'{verify["max_abs_diff_embedding"]:.1e}, '
                f'{verify["params_loaded"]} of {verify["params_torch"]} '
                'torch parameters loaded')
      lines.append(f'{name}: the torch reference computes the same function '
                   f'as JAX: {verify.get("ok", False)} ({detail})')
  return '\n'.join([common.format_table(headers, rows), ''] + lines)


def describe_ops(summary: dict[str, Any]) -> str:
  """The op implementations, fused kernels and peak device memory of a
  JAX summary, in one line."""
  calls = summary.get('attention_calls') or {}
  parts = [f"attention {summary.get('attention') or '-'} (fused attention "
           'in the compiled train step: ' +
           (', '.join(f'{t} x{n}' for t, n in sorted(calls.items()))
            or 'none') + ')']
  if summary.get('conv'):
    parts.append(f"conv {summary['conv']}")
  peak = summary.get('peak_device_gib')
  parts.append(f'peak device memory {peak:.1f} GiB' if peak is not None
               else 'peak device memory - (not reported)')
  return ', '.join(parts)


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default='convnet_small,vit_b16',
                      help="'name[:train_batch[:infer_batch]],...' of "
                      f'{sorted(common.CASES)}')
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS))
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--infer_warmup', type=int, default=2)
  parser.add_argument('--infer_steps', type=int, default=10)
  parser.add_argument('--dtype', default='float32',
                      help='compute dtype (config.model.dtype); params stay '
                      'float32')
  parser.add_argument('--matmul_size', type=int, default=2048)
  parser.add_argument('--conv', default='auto', choices=CONV_CHOICES,
                      help="JAX convolutions (config.model.conv); 'xla' "
                      'shows the speed without the CPU kernel of '
                      'reverse_sd/ops/cpu/conv.cc')
  parser.add_argument('--attention', default='auto',
                      choices=ATTENTION_CHOICES,
                      help='JAX attention (config.model.attention; '
                      'reverse_sd/ops/attention.py)')
  parser.add_argument('--micro_batch', type=int, default=-1,
                      help='JAX predict step: examples per device per '
                      'forward pass (config.eval.micro_batch; -1 auto, 0 '
                      'the whole inference batch)')
  parser.add_argument('--threads', type=int, default=len(common.cores()),
                      help='cores per worker: pinned to the first N, '
                      'torch.set_num_threads(N), BLAS/OpenMP threads N')
  parser.add_argument('--torch_python',
                      default=str(REPO / '.venv-ref' / 'bin' / 'python'))
  parser.add_argument('--torch_device', default='cpu')
  parser.add_argument('--verify', action=argparse.BooleanOptionalAction,
                      default=True)
  parser.add_argument('--worker_timeout', type=float, default=3600)
  parser.add_argument('--quick', action='store_true',
                      help=f'smoke run: {common.QUICK_IMAGE_SIZE} px, batch '
                      f'{common.QUICK_BATCH}, {common.QUICK_WARMUP}+'
                      f'{common.QUICK_STEPS} steps, 1 round')
  parser.add_argument('--output', default=DEFAULT_OUTPUT)
  # Worker modes (the driver runs itself in subprocesses).
  parser.add_argument('--worker', default='',
                      choices=['', 'jax', 'matmul', 'dump'],
                      help=argparse.SUPPRESS)
  parser.add_argument('--spec', default='', help=argparse.SUPPRESS)
  parser.add_argument('--dump', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.warmup = args.infer_warmup = common.QUICK_WARMUP
    args.steps = args.infer_steps = common.QUICK_STEPS
    args.rounds = 1
    args.matmul_size = min(args.matmul_size, 256)
    if args.output == DEFAULT_OUTPUT:
      args.output = 'benchmarks/results/train_step_quick.json'
  if not 1 <= args.threads <= len(common.cores()):
    parser.error(f'--threads={args.threads}: this process may use '
                 f'{len(common.cores())} cores.')
  unknown = set(args.frameworks.split(',')) - set(FRAMEWORKS)
  if unknown:
    parser.error(f'--frameworks: unknown {sorted(unknown)}; choose from '
                 f'{FRAMEWORKS}.')
  return args


def _worker_main(args) -> None:
  if args.worker == 'matmul':
    result = measure_matmul(args.matmul_size, args.dtype)
  elif args.worker == 'dump':
    result = dump_jax_reference(json.loads(args.spec), args.dump)
  else:
    result = measure_jax(json.loads(args.spec))
  print(json.dumps(result))


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.worker:
    _worker_main(args)
    return
  started = time.time()
  busy_cores = common.warn_if_busy()
  frameworks = [f for f in FRAMEWORKS if f in args.frameworks.split(',')]
  if (any(f.startswith('torch') for f in frameworks) and
      not os.path.exists(args.torch_python)):
    raise SystemExit(f'--torch_python={args.torch_python} does not exist: '
                     'make it with bash tools/reference/setup_env.sh, or pass '
                     '--frameworks=jax.')
  payload = {'benchmark': 'train_step', 'date': common.now(),
             'git': common.git_revision(), 'machine': common.machine(),
             'busy_cores_at_start': busy_cores,
             'argv': [sys.executable] + sys.argv, 'settings': vars(args),
             # glibc's allocator settings in every worker (common.worker_env).
             'worker_malloc_env': {
                 name: value for name, value in common.worker_env().items()
                 if name.startswith('MALLOC_')},
             'cases': {}}
  payload['matmul_peak'] = {'start': _matmul_peak(args, 'start')}
  for case in common.parse_cases(args.cases, args.quick):
    spec = make_spec(case, args)
    case_frameworks = [f for f in frameworks if f == 'jax' or
                       case['backbone'] not in common.JAX_ONLY_BACKBONES]
    entry = {'spec': spec, 'runs': {f: [] for f in case_frameworks}}
    if args.verify and any(f.startswith('torch') for f in case_frameworks):
      entry['verify'] = _verify(spec, args)
    for round_index in range(args.rounds):
      for framework in case_frameworks:
        label = f'{spec["name"]} {framework} round {round_index + 1}'
        if framework == 'jax':
          command = _jax_command('jax', spec=json.dumps(spec))
        else:
          mode = framework.removeprefix('torch_')
          extra = ({'matmul_size': args.matmul_size} if mode == 'eager'
                   else {})
          command = _torch_command(args, spec=json.dumps(spec), mode=mode,
                                   device=args.torch_device, **extra)
        entry['runs'][framework].append(_run(command, args, label))
    payload['cases'][spec['name']] = entry
  payload['matmul_peak']['end'] = _matmul_peak(args, 'end')
  peaks = [p['flops_per_s'] for p in payload['matmul_peak'].values()
           if 'flops_per_s' in p]
  peak = max(peaks) if peaks else None
  payload['matmul_peak']['used_flops_per_s'] = peak
  for entry in payload['cases'].values():
    entry['summary'] = summarize_case(entry['runs'], peak)
    entry['ratios'] = ratios(entry['summary'])
  payload['total_s'] = time.time() - started
  path = common.write_json(args.output, payload)
  print(f'matmul peak ({args.matmul_size}^3 {args.dtype}): '
        f'{peak / 1e9:.1f} GFLOP/s' if peak else 'matmul peak: failed')
  print(format_report(payload['cases']))
  print(f'wrote {path} ({payload["total_s"]:.0f} s)')


if __name__ == '__main__':
  main()
