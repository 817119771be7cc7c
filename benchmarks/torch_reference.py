r"""PyTorch reference of reverse_sd's model, loss and optimiser, for timing.

Runs in the reference environment (`.venv-ref`: torch, transformers 5), as
a worker of `benchmarks/train_step.py`, which passes the case as JSON:

  .venv-ref/bin/python benchmarks/torch_reference.py --spec=JSON \
      --mode=eager|compile [--device=cpu|cuda]
  .venv-ref/bin/python benchmarks/torch_reference.py --spec=JSON \
      --verify=reference.npz

The model is the same function as `reverse_sd.models.reverse_model`:
uint8 NHWC images, CLIP mean/std normalisation, a backbone, an optional
GELU MLP and a Dense projection to 384, L2-normalised.
- ConvNet: stride-2 3x3 convolutions with Flax's SAME padding (the extra
  row and column at the end), ReLU, flatten in NHWC order, Dense + ReLU.
- ViT: transformers' `CLIPVisionModel` from a `CLIPVisionConfig` with the
  variant's shapes (random init, nothing downloaded); `pooler_output` is the
  post-LayerNorm class token, as in `models/vit.py`.
The loss is (1 - cosine) + Huber (mean over dimensions), the optimiser
AdamW with weight decay on matrices and kernels only, after clipping the
global gradient norm. The learning rate is constant (the JAX side's warm-up
schedule costs nothing measurable).

`--verify` loads the JAX model's parameters (written by
`train_step.py --worker=dump`) and compares the outputs on its images.

Prints one JSON line: per phase the raw step times, their median, the
first steps' times (torch.compile compiles there), peak RSS, versions.
"""

import argparse
import json
import math
import pathlib
import sys
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable-next=wrong-import-position
from benchmarks import common


def _same_padding(size: int, kernel: int = 3, stride: int = 2
                  ) -> tuple[int, int]:
  """XLA/Flax 'SAME': output ceil(size/stride); the odd pixel goes last."""
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class ConvNet(nn.Module):
  """`models/convnet.py`: images [B,3,H,W] -> features [B,output_dim]."""

  def __init__(self, channels, output_dim: int, image_size: int):
    super().__init__()
    self.convs = nn.ModuleList()
    self.paddings = []
    size, in_channels = image_size, 3
    for out_channels in channels:
      low, high = _same_padding(size)
      self.paddings.append((low, high, low, high))
      self.convs.append(nn.Conv2d(in_channels, out_channels, 3, stride=2))
      size, in_channels = math.ceil(size / 2), out_channels
    self.readout = nn.Linear(size * size * in_channels, output_dim)

  def forward(self, images_Bx3xHxW):
    x = images_Bx3xHxW
    for conv, padding in zip(self.convs, self.paddings):
      x = F.relu(conv(F.pad(x, padding)))
    # Flax flattens [B,H,W,C]: the same order keeps the readout identical.
    x = x.permute(0, 2, 3, 1).flatten(1)
    return F.relu(self.readout(x))


class ClipVision(nn.Module):
  """transformers' CLIPVisionModel -> pooled [B,width]."""

  def __init__(self, shape: dict[str, Any], image_size: int):
    super().__init__()
    # pylint: disable=g-import-not-at-top
    import transformers
    config = transformers.CLIPVisionConfig(
        hidden_size=shape['width'], intermediate_size=shape['mlp_dim'],
        num_hidden_layers=shape['layers'],
        num_attention_heads=shape['heads'], patch_size=shape['patch_size'],
        image_size=image_size, hidden_act=shape['activation'],
        layer_norm_eps=shape['layer_norm_eps'], num_channels=3)
    self.tower = transformers.CLIPVisionModel(config)

  def forward(self, images_Bx3xHxW):
    return self.tower(pixel_values=images_Bx3xHxW).pooler_output


class EmbeddingHead(nn.Module):
  """`models/heads.py`: GELU (tanh) MLP, Dense, L2 normalise (eps 1e-6)."""

  def __init__(self, in_dim: int, hidden, embedding_dim: int):
    super().__init__()
    widths = [in_dim, *hidden]
    self.hidden = nn.ModuleList(nn.Linear(a, b)
                                for a, b in zip(widths, widths[1:]))
    self.projection = nn.Linear(widths[-1], embedding_dim)

  def forward(self, features):
    x = features
    for layer in self.hidden:
      x = F.gelu(layer(x), approximate='tanh')
    x = self.projection(x).float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class ReverseModel(nn.Module):
  """uint8 [B,H,W,3] -> (unit embedding [B,D], features [B,F])."""

  def __init__(self, spec: dict[str, Any]):
    super().__init__()
    shape = spec['shape']
    if spec['backbone'] == 'convnet':
      self.backbone = ConvNet(shape['channels'], shape['output_dim'],
                              spec['image_size'])
      features = shape['output_dim']
    elif spec['backbone'] == 'vit':
      self.backbone = ClipVision(shape, spec['image_size'])
      features = shape['width']
    else:
      raise ValueError(f'No torch reference for backbone '
                       f'{spec["backbone"]!r} (convnet, vit).')
    self.head = EmbeddingHead(features, spec['head_hidden'],
                              spec['embedding_dim'])
    self.register_buffer('mean', torch.tensor(spec['image_mean']) * 255.0)
    self.register_buffer('std', torch.tensor(spec['image_std']) * 255.0)

  def forward(self, images_BxHxWx3):
    x = (images_BxHxWx3.float() - self.mean) / self.std
    features = self.backbone(x.permute(0, 3, 1, 2))
    return self.head(features), features


class LossModel(nn.Module):
  """The train step's loss: mean over the batch of (1 - cos) + Huber."""

  def __init__(self, model: ReverseModel, loss: dict[str, Any]):
    super().__init__()
    self.model = model
    self.loss = loss

  def forward(self, images, targets):
    pred, _ = self.model(images)
    pred = pred.float()
    cosine = F.cosine_similarity(pred, targets, dim=-1, eps=1e-8)
    huber = F.huber_loss(pred, targets, reduction='none',
                         delta=self.loss['huber_delta']).mean(-1)
    return (self.loss['cosine_weight'] * (1 - cosine) +
            self.loss['huber_weight'] * huber).mean()


def make_optimizer(model: nn.Module, optim: dict[str, Any]):
  """AdamW; weight decay on parameters with ndim > 1 (`optim._decay_mask`)."""
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{'params': [p for p in params if p.ndim > 1],
             'weight_decay': optim['weight_decay']},
            {'params': [p for p in params if p.ndim <= 1],
             'weight_decay': 0.0}]
  return torch.optim.AdamW(groups, lr=optim['lr'],
                           betas=(optim['b1'], optim['b2']), eps=1e-8,
                           foreach=True), params


def _inputs(spec, batch: int, device, seed: int):
  rng = np.random.default_rng(seed)
  size = spec['image_size']
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  targets = rng.normal(size=(batch, spec['embedding_dim'])).astype(np.float32)
  targets /= np.linalg.norm(targets, axis=1, keepdims=True)
  return (torch.from_numpy(images).to(device),
          torch.from_numpy(targets).to(device))


def _sync(device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize()


def _autocast(spec, device):
  if spec['dtype'] == 'float32':
    return torch.autocast(device.type, enabled=False)
  return torch.autocast(device.type, dtype=getattr(torch, spec['dtype']))


def measure(spec: dict[str, Any], mode: str, device_name: str
            ) -> dict[str, Any]:
  """Train and inference step times of the torch reference."""
  device = torch.device(device_name)
  torch.manual_seed(spec['seed'])
  model = ReverseModel(spec).to(device)
  loss_model = LossModel(model, spec['loss'])
  optimizer, params = make_optimizer(model, spec['optim'])
  result = {'framework': f'torch_{mode}', 'case': spec['name'],
            'dtype': spec['dtype'], 'device': str(device),
            'torch_version': torch.__version__,
            'num_threads': torch.get_num_threads(),
            'cores': len(common.cores()),
            'num_interop_threads': torch.get_num_interop_threads(),
            'param_count': sum(p.numel() for p in params), 'num_devices': 1}
  if spec['backbone'] == 'vit':
    # pylint: disable=g-import-not-at-top
    import transformers
    result['transformers_version'] = transformers.__version__
    # pylint: disable-next=protected-access
    result['attn_implementation'] = (
        model.backbone.tower.config._attn_implementation)
  images, targets = _inputs(spec, spec['train_batch'], device, spec['seed'])
  compute_loss = torch.compile(loss_model) if mode == 'compile' else loss_model
  last = {}

  def train_once():
    optimizer.zero_grad(set_to_none=True)
    with _autocast(spec, device):
      loss = compute_loss(images, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, spec['optim']['grad_clip_norm'],
                                   foreach=True)
    optimizer.step()
    _sync(device)
    last['loss'] = loss.detach()

  if mode == 'eager':
    result['flop_counter_per_image'] = _count_flops(
        loss_model, images, targets, spec, device)
  model.train()
  try:
    counters = {}
    warmup_times, times = common.time_steps(
        train_once, warmup=spec['warmup'], steps=spec['steps'],
        counters=counters)
    result['train'] = dict(common.summarize(times), **counters,
                           batch=spec['train_batch'],
                           warmup_times_s=warmup_times,
                           final_loss=float(last['loss']))
  except Exception as e:  # pylint: disable=broad-except
    # torch.compile can fail on a CPU without a usable compiler: record it.
    result['train'] = {'error': f'{type(e).__name__}: {str(e)[:2000]}'}
  result['peak_rss_mb_after_train'] = common.peak_rss_mb()
  result['infer'] = _measure_inference(spec, mode, model, device)
  result['peak_rss_mb'] = common.peak_rss_mb()
  return result


def _measure_inference(spec, mode, model, device) -> dict[str, Any]:
  model.eval()
  images, _ = _inputs(spec, spec['infer_batch'], device, spec['seed'] + 1)
  forward = torch.compile(model) if mode == 'compile' else model

  def infer_once():
    with torch.inference_mode(), _autocast(spec, device):
      forward(images)
    _sync(device)

  counters = {}
  try:
    warmup_times, times = common.time_steps(
        infer_once, warmup=spec['infer_warmup'], steps=spec['infer_steps'],
        counters=counters)
  except Exception as e:  # pylint: disable=broad-except
    return {'error': f'{type(e).__name__}: {str(e)[:2000]}'}
  return dict(common.summarize(times), **counters, batch=spec['infer_batch'],
              warmup_times_s=warmup_times)


def _count_flops(loss_model, images, targets, spec, device) -> float | None:
  """torch's own count (matmuls and convolutions only) of forward +
  backward, per image: a cross-check of XLA's count."""
  try:
    # pylint: disable=g-import-not-at-top
    from torch.utils import flop_counter
    counter = flop_counter.FlopCounterMode(display=False)
    with counter, _autocast(spec, device):
      loss_model(images, targets).backward()
    loss_model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]
  except Exception:  # pylint: disable=broad-except
    return None


def measure_matmul(size: int, dtype: str, device_name: str,
                   steps: int = 20) -> dict[str, Any]:
  """Median FLOP/s of a size^3 matmul in torch."""
  device = torch.device(device_name)
  a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
  b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))

  def once():
    torch.matmul(a, b)
    _sync(device)

  _, times = common.time_steps(once, warmup=3, steps=steps)
  summary = common.summarize(times)
  return dict(summary, size=size, dtype=dtype,
              flops_per_s=2.0 * size**3 / summary['median_s'])


# Flax parameter path -> torch state-dict key, for --verify.
def _torch_key(path: str, backbone: str) -> str:
  parts = path.split('/')
  if parts[0] == 'head':
    return 'head.' + ('projection' if parts[1] == 'projection' else
                      f'hidden.{parts[1].split("_")[1]}') + '.' + _leaf(
                          parts[2])
  if backbone == 'convnet':
    layer = parts[1]
    prefix = ('backbone.readout' if layer == 'readout' else
              f'backbone.convs.{layer.removeprefix("conv")}')
    return f'{prefix}.{_leaf(parts[2])}'
  # ViT: backbone/<module>[/<sub>...]/<leaf>, laid out like HF's tower.
  rest = parts[1:]
  names = {'class_embedding': 'embeddings.class_embedding',
           'position_embedding': 'embeddings.position_embedding.weight'}
  if rest[0] in names:
    return 'backbone.tower.' + names[rest[0]]
  if rest[0] == 'patch_embedding':
    return 'backbone.tower.embeddings.patch_embedding.weight'
  if rest[0].startswith('layers_'):
    index = rest[0].split('_')[1]
    module = '.'.join({'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2'}.get(m, m)
                      for m in rest[1:-1])
    return (f'backbone.tower.encoder.layers.{index}.{module}.'
            f'{_leaf(rest[-1])}')
  return f'backbone.tower.{".".join(rest[:-1])}.{_leaf(rest[-1])}'


def _leaf(name: str) -> str:
  return {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[name]


def _torch_value(array: np.ndarray) -> torch.Tensor:
  if array.ndim == 4:  # Conv kernel HWIO -> OIHW.
    array = array.transpose(3, 2, 0, 1)
  elif array.ndim == 2:  # Dense kernel [in, out] -> Linear weight [out, in].
    array = array.T
  return torch.from_numpy(np.ascontiguousarray(array))


def verify(spec: dict[str, Any], path: str) -> dict[str, Any]:
  """Loads the JAX params into the torch model; compares outputs."""
  reference = np.load(path)
  model = ReverseModel(spec).eval()
  state = model.state_dict()
  loaded, problems = set(), []
  for name in reference.files:
    if not name.startswith('param/'):
      continue
    flax_path = name.removeprefix('param/')
    array = reference[name]
    key = _torch_key(flax_path, spec['backbone'])
    if flax_path.endswith('position_embedding'):
      value = torch.from_numpy(array)  # A table, not a kernel.
    else:
      value = _torch_value(array)
    if key not in state:
      problems.append(f'{flax_path} -> {key}: no such torch parameter')
    elif tuple(state[key].shape) != tuple(value.shape):
      problems.append(f'{flax_path} -> {key}: shape {tuple(value.shape)} '
                      f'!= {tuple(state[key].shape)}')
    else:
      state[key] = value
      loaded.add(key)
  expected = {k for k, v in model.named_parameters()}
  missing = sorted(expected - loaded)
  model.load_state_dict(state)
  with torch.no_grad():
    embedding, features = model(torch.from_numpy(reference['images']))
  diff_embedding = float(np.abs(embedding.numpy() -
                                reference['embedding']).max())
  diff_features = float(np.abs(features.numpy() -
                               reference['features']).max())
  feature_scale = float(np.abs(reference['features']).max())
  ok = (not problems and not missing and diff_embedding < 1e-4 and
        diff_features < 1e-4 * max(1.0, feature_scale))
  return {'ok': ok, 'max_abs_diff_embedding': diff_embedding,
          'max_abs_diff_features': diff_features,
          'feature_scale': feature_scale,
          'params_loaded': len(loaded), 'params_torch': len(expected),
          'problems': problems[:20], 'missing': missing[:20]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--spec', required=True, help='the case, as JSON')
  parser.add_argument('--mode', default='eager', choices=['eager', 'compile'])
  parser.add_argument('--device', default='cpu')
  parser.add_argument('--verify', default='',
                      help='npz from train_step.py --worker=dump')
  parser.add_argument('--matmul_size', type=int, default=0,
                      help='also time a size^3 matmul in torch')
  args = parser.parse_args()
  spec = json.loads(args.spec)
  torch.set_num_threads(spec.get('threads') or len(common.cores()))
  if args.verify:
    result = verify(spec, args.verify)
  else:
    result = measure(spec, args.mode, args.device)
    if args.matmul_size:
      result['matmul'] = measure_matmul(args.matmul_size, spec['dtype'],
                                        args.device)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
