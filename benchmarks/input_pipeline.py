r"""Input pipeline throughput: decode + preprocess + batch, in images/s.

  .venv/bin/python benchmarks/input_pipeline.py           # full (~2 min)
  .venv/bin/python benchmarks/input_pipeline.py --quick   # smoke

Two streams, each read through the trainer's own `pipeline.TrainStream`
(grain, `config.data.num_read_threads` threads, prefetch as configured):

(a) synthetic: the default synthetic corpus of `configs/synthetic.py`
    (`datasets.load_splits`, built and cached on first use), train split,
    64 px images as stored, batch `config.train.batch_size`.
(b) diffusiondb: `--num_images` 512x512 lossless WebP images written as one
    DiffusionDB Large part in a temporary folder (the layout of
    `tests/fake_assets.py`), built by `build.build_diffusiondb` at
    image_size 256 (PNG), read with CLIP's preprocessing
    (`preprocess.clip_preprocess(image, 224)`, as `datasets.image_fn` with
    `config.data.input_size=224`). The images are smooth colour fields plus
    noise (about 470 KB each, like DiffusionDB's); decode cost depends on
    content. Also reported: the one-off build rate, and the raw decode rate
    of the WebP files (bytes in memory; 1 thread and one per core).

The targets here are random unit vectors (the stream's cost does not depend
on them; no text encoder runs). The ratio column divides the stream's rate
by the train step's consumption rate (JAX, from `--train_step_json`, or
`--synthetic_train_rate` / `--clip_train_rate`): above 1, the pipeline
keeps up. Both were measured alone; in training they share the cores.

Writes `--output` (default benchmarks/results/input_pipeline.json).
"""

import argparse
import concurrent.futures
import functools
import io
import json
import pathlib
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from PIL import Image

from benchmarks import common
from configs import synthetic
from reverse_sd.data import build
from reverse_sd.data import datasets
from reverse_sd.data import pipeline
from reverse_sd.data import preprocess
from reverse_sd.data import targets as targets_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

DEFAULT_OUTPUT = 'benchmarks/results/input_pipeline.json'
CLIP_SIZE = 224
STORED_SIZE = 256


def measure_stream(split: pipeline.SplitData, *, batch_size: int,
                   warmup_batches: int, batches: int, num_threads: int,
                   prefetch: int) -> dict[str, Any]:
  """images/s of `TrainStream` over `batches` batches after a warm-up."""
  stream = pipeline.TrainStream(
      split, global_batch_size=batch_size, shuffle_seed=0, process_index=0,
      process_count=1, num_threads=num_threads, prefetch=prefetch)
  iterator = stream.iterate(0)
  start = time.perf_counter()
  for _ in range(warmup_batches):
    next(iterator)
  warmup_s = time.perf_counter() - start
  times = []
  start = time.perf_counter()
  for _ in range(batches):
    batch_start = time.perf_counter()
    batch = next(iterator)
    times.append(time.perf_counter() - batch_start)
  total = time.perf_counter() - start
  return dict(common.summarize(times), batch=batch_size,
              image_shape=list(batch['image'].shape[1:]),
              num_threads=num_threads, prefetch=prefetch,
              warmup_batches=warmup_batches, warmup_s=warmup_s,
              total_s=total, images=batch_size * batches,
              images_per_s=batch_size * batches / total)


def synthetic_stream(args) -> dict[str, Any]:
  """(a): the synthetic corpus through the trainer's stream."""
  config = synthetic.get_config('tiny' if args.quick else '')
  start = time.perf_counter()
  split = datasets.load_splits(config, ['train'])['train']
  open_s = time.perf_counter() - start
  batch = common.QUICK_BATCH if args.quick else config.train.batch_size
  result = measure_stream(
      split, batch_size=batch, warmup_batches=args.warmup_batches,
      batches=args.batches, num_threads=config.data.num_read_threads,
      prefetch=config.data.prefetch_batches)
  return dict(result, open_s=open_s, num_examples=len(split),
              config='configs/synthetic.py:' + ('tiny' if args.quick else ''))


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
  """A bicubic-upsampled 8x8 colour field plus Gaussian noise (sigma 6)."""
  base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(base).resize((size, size),
                                                  Image.BICUBIC), np.float32)
  image += rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def _encode_webp(seed: int, size: int) -> bytes:
  """Lossless like DiffusionDB Large; low encoder effort (which speeds up
  writing and hardly changes decoding)."""
  buffer = io.BytesIO()
  Image.fromarray(smooth_image(np.random.default_rng(seed), size)).save(
      buffer, format='WEBP', lossless=True, method=1, quality=25)
  return buffer.getvalue()


def write_large_part(manual_dir: pathlib.Path, count: int, size: int,
                     workers: int) -> list[pathlib.Path]:
  """One unzipped DiffusionDB Large part: <uuid>.webp + part-000001.json."""
  part = manual_dir / 'diffusiondb-large-part-1' / 'part-000001'
  part.mkdir(parents=True)
  rng = np.random.default_rng(0)
  names = [f'{rng.bytes(16).hex()}.webp' for _ in range(count)]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    encoded = list(pool.map(functools.partial(_encode_webp, size=size),
                            range(count)))
  entries = {}
  colours, things = ['red', 'blue', 'green', 'golden'], ['house', 'robot',
                                                         'tree', 'boat']
  for index, (name, data) in enumerate(zip(names, encoded)):
    (part / name).write_bytes(data)
    entries[name] = {'p': f'benchmark image {index}: a {colours[index % 4]} '
                          f'{things[index // 4 % 4]}, artstation',
                     'se': index, 'c': 7.0, 'st': 50, 'sa': 'k_lms'}
  (part / 'part-000001.json').write_text(json.dumps(entries))
  return [part / name for name in names]


def measure_decode(files: list[pathlib.Path], workers: int) -> dict[str, Any]:
  """images/s of `preprocess.load_image` on in-memory bytes."""
  data = [f.read_bytes() for f in files]
  start = time.perf_counter()
  if workers == 1:
    for item in data:
      preprocess.load_image(item)
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(preprocess.load_image, data))
  seconds = time.perf_counter() - start
  return {'threads': workers, 'images': len(data), 'seconds': seconds,
          'images_per_s': len(data) / seconds,
          'mean_file_kb': sum(len(d) for d in data) / len(data) / 1024}


def _random_table(source) -> targets_lib.SplitTable:
  """Ids and random unit targets for `source`: the stream needs a table,
  not real embeddings."""
  count = len(source)
  embeddings = np.random.default_rng(0).normal(
      size=(count, 384)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  return targets_lib.SplitTable(
      ids=np.asarray([str(i) for i in range(count)]),
      prompts=np.asarray([''] * count), embeddings=embeddings,
      attributes=None)


def diffusiondb_stream(args) -> dict[str, Any]:
  """(b): DiffusionDB-format WebP, built at 256 px, read at 224 (CLIP)."""
  workers = len(common.cores())
  with tempfile.TemporaryDirectory() as tmp:
    manual_dir = pathlib.Path(tmp) / 'manual'
    start = time.perf_counter()
    files = write_large_part(manual_dir, args.num_images, args.webp_size,
                             workers)
    write_s = time.perf_counter() - start
    decode = [measure_decode(files, 1)]
    if workers > 1:
      decode.append(measure_decode(files, workers))
    start = time.perf_counter()
    builder = build.build_diffusiondb(
        pathlib.Path(tmp) / 'data', manual_dir, collection='large',
        parts='1', image_size=STORED_SIZE, num_workers=workers,
        progress=False)
    build_s = time.perf_counter() - start
    source = builder.as_data_source('train')
    split = pipeline.SplitData(
        'train', source, _random_table(source),
        image_fn=functools.partial(preprocess.clip_preprocess,
                                   size=CLIP_SIZE))
    config = synthetic.get_config('')  # The data.* reading defaults.
    batch = common.QUICK_BATCH if args.quick else args.clip_batch
    result = measure_stream(
        split, batch_size=batch, warmup_batches=args.warmup_batches,
        batches=args.batches, num_threads=config.data.num_read_threads,
        prefetch=config.data.prefetch_batches)
  return dict(result, num_examples=len(split), webp_files=len(files),
              webp_size=args.webp_size, stored_size=STORED_SIZE,
              write_s=write_s, build_s=build_s,
              build_images_per_s=len(files) / build_s, raw_decode=decode)


def train_rates(args) -> dict[str, dict[str, Any]]:
  """The JAX train step's images/s per stream, and where it came from."""
  report = common.read_json(args.train_step_json) or {}
  out = {}
  for stream, case, flag in (('synthetic', 'convnet_small',
                              args.synthetic_train_rate),
                             ('diffusiondb', 'vit_b16', args.clip_train_rate)):
    if flag:
      out[stream] = {'images_per_s': flag, 'source': 'flag'}
      continue
    summary = (report.get('cases', {}).get(case, {}).get('summary', {})
               .get('jax', {}))
    rate = summary.get('train_images_per_s')
    out[stream] = ({'images_per_s': rate, 'source': f'{args.train_step_json}'
                                                    f' ({case}, jax)'}
                   if rate else {'images_per_s': None, 'source': 'none'})
  return out


def format_report(streams: dict[str, dict], rates: dict[str, dict]) -> str:
  rows = []
  for name, s in streams.items():
    rate = rates[name]['images_per_s']
    rows.append([name, 'x'.join(map(str, s['image_shape'])), s['batch'],
                 s['images_per_s'], rate,
                 s['images_per_s'] / rate if rate else None,
                 rates[name]['source']])
  table = common.format_table(
      ['stream', 'image', 'batch', 'pipeline img/s', 'train img/s',
       'pipeline/train', 'train rate from'], rows)
  lines = [table]
  db = streams.get('diffusiondb', {})
  for decode in db.get('raw_decode', []):
    lines.append(f'raw WebP decode ({db["webp_size"]} px, '
                 f'{decode["mean_file_kb"]:.0f} KB, {decode["threads"]} '
                 f'thread(s)): {decode["images_per_s"]:.0f} img/s')
  if 'build_images_per_s' in db:
    lines.append(f'one-off build (WebP -> {db["stored_size"]} px PNG, '
                 f'{len(common.cores())} workers): '
                 f'{db["build_images_per_s"]:.0f} img/s')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--streams', default='synthetic,diffusiondb')
  parser.add_argument('--num_images', type=int, default=256)
  parser.add_argument('--webp_size', type=int, default=512)
  parser.add_argument('--clip_batch', type=int, default=32)
  parser.add_argument('--warmup_batches', type=int, default=3)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--train_step_json',
                      default='benchmarks/results/train_step.json')
  parser.add_argument('--synthetic_train_rate', type=float, default=0.0,
                      help='images/s of the train step, if not from JSON')
  parser.add_argument('--clip_train_rate', type=float, default=0.0)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--output', default=DEFAULT_OUTPUT)
  args = parser.parse_args()
  if args.quick:
    args.num_images = 16
    if args.train_step_json == 'benchmarks/results/train_step.json':
      args.train_step_json = 'benchmarks/results/train_step_quick.json'
    args.warmup_batches, args.batches = 1, 3
    if args.output == DEFAULT_OUTPUT:
      args.output = 'benchmarks/results/input_pipeline_quick.json'
  measures = {'synthetic': synthetic_stream, 'diffusiondb': diffusiondb_stream}
  names = [s for s in args.streams.split(',') if s]
  unknown = sorted(set(names) - set(measures))
  if unknown:
    parser.error(f'--streams: unknown {unknown}; choose from '
                 f'{sorted(measures)}.')
  busy_cores = common.warn_if_busy()
  payload = {'benchmark': 'input_pipeline', 'date': common.now(),
             'git': common.git_revision(), 'machine': common.machine(),
             'busy_cores_at_start': busy_cores,
             'argv': [sys.executable] + sys.argv, 'settings': vars(args),
             'streams': {}}
  for name in names:
    common.log(f'measuring {name}')
    payload['streams'][name] = measures[name](args)
  payload['train_rates'] = train_rates(args)
  payload['peak_rss_mb'] = common.peak_rss_mb()
  path = common.write_json(args.output, payload)
  print(format_report(payload['streams'], payload['train_rates']))
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
