"""Tiny fake DiffusionDB parts and image folders, in the real file formats.

Each writer returns a `FakeAssets` saying what it wrote, so tests can check
the builders' counts without repeating the layout. Images are small and
non-square (48 wide, 40 high) so resizing and cropping are exercised.

DiffusionDB 2M (`write_diffusiondb`), under manual_dir:
  images/part-000001.zip  11 items: 6 good (2 share a prompt), 1 truncated
                          PNG, 2 bad JSON entries, 1 image with no JSON
                          entry, 1 JSON entry with no image.
  images/part-000002.zip  8 good (2 share the shared prompt, 1 is a byte
                          copy of a part-1 image with the same prompt).
  images/part-000003/     6 good, unzipped.
  images/part-000004.zip  3 images and a JSON file that does not parse.
  metadata.parquet        the real columns and dtypes, with NSFW scores
                          (above 0.5 for two images, 2.0 for one of them;
                          -1 for one), one prompt that differs from the
                          JSON; the truncated image has no row.
DiffusionDB Large: diffusiondb-large-part-1/part-000001/ (5 lossless WebP,
unzipped) and diffusiondb-large-part-2/part-010001.zip (4 WebP).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import pathlib
import uuid
import zipfile

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 48, 40
SHARED_PROMPT = 'A red cat,  sitting on a Mat'
SHARED_PROMPT_VARIANT = 'a red cat, sitting on a mat '  # Same when normalised.


@dataclasses.dataclass
class FakeAssets:
  """What a writer put on disk (ids are the builders' `id` feature)."""
  root: pathlib.Path
  good_ids: dict[str, str] = dataclasses.field(default_factory=dict)  # id->p
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # ->why
  skipped_parts: list[str] = dataclasses.field(default_factory=list)
  notes: dict[str, object] = dataclasses.field(default_factory=dict)


def random_image(rng: np.random.Generator, width: int = WIDTH,
                 height: int = HEIGHT) -> np.ndarray:
  """Blocky random colours (compress a little, unlike pure noise)."""
  blocks = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3),
                        dtype=np.uint8)
  return np.repeat(np.repeat(blocks, 4, 0), 4, 1)[:height, :width]


def encode(image: np.ndarray, image_format: str = 'PNG', **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=image_format, **kwargs)
  return buffer.getvalue()


def truncated_png(rng: np.random.Generator) -> bytes:
  """A PNG cut in the middle of its image data: opens, fails to load."""
  data = encode(random_image(rng))
  return data[:len(data) // 2]


def _name(rng: np.random.Generator, extension: str) -> str:
  return f'{uuid.UUID(bytes=rng.bytes(16), version=4)}.{extension}'


def _entry(prompt, rng) -> dict:
  return {'p': prompt, 'se': int(rng.integers(0, 2**32)), 'c': 7.0,
          'st': 50, 'sa': 'k_lms'}


def _write_part(location: pathlib.Path, number: int,
                files: dict[str, bytes], entries: dict | bytes,
                zipped: bool) -> pathlib.Path:
  json_name = f'part-{number:06d}.json'
  json_bytes = (entries if isinstance(entries, bytes) else
                json.dumps(entries, indent=1).encode())
  location.mkdir(parents=True, exist_ok=True)
  if zipped:
    path = location / f'part-{number:06d}.zip'
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
      for name, data in files.items():
        archive.writestr(name, data)
      archive.writestr(json_name, json_bytes)
    return path
  path = location / f'part-{number:06d}'
  path.mkdir()
  for name, data in files.items():
    (path / name).write_bytes(data)
  (path / json_name).write_bytes(json_bytes)
  return path


def _prompt(part: int, index: int) -> str:
  return f'prompt {part}-{index}: a {["blue", "green", "tiny"][index % 3]} ' \
         f'{["house", "tree", "robot", "boat"][index % 4]}, artstation'


def write_diffusiondb(root: os.PathLike[str] | str,
                      seed: int = 0) -> FakeAssets:
  """Writes the 2M parts, the Large parts and metadata.parquet (see top)."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  fake = FakeAssets(root)
  metadata_rows = []

  def good(part, files, entries, prompt):
    name = _name(rng, 'png')
    files[name] = encode(random_image(rng))
    entries[name] = _entry(prompt, rng)
    fake.good_ids[f'part-{part:06d}/{name}'] = prompt
    metadata_rows.append(dict(image_name=name, prompt=prompt, part_id=part,
                              entry=entries[name]))
    return name

  images = root / 'images'
  # Part 1: the problem cases.
  files, entries = {}, {}
  for index in range(6):
    prompt = SHARED_PROMPT if index < 2 else _prompt(1, index)
    name = good(1, files, entries, prompt)
    if index == 2:
      fake.notes['copied_image'] = (name, files[name], prompt)
    if index == 3:
      fake.notes['image_nsfw_id'] = f'part-000001/{name}'
  corrupt = _name(rng, 'png')
  files[corrupt] = truncated_png(rng)
  entries[corrupt] = _entry('a corrupt image', rng)
  fake.skipped[f'part-000001/{corrupt}'] = 'corrupt_image'
  fake.notes['corrupt_name'] = corrupt
  no_prompt = _name(rng, 'png')
  files[no_prompt] = encode(random_image(rng))
  entries[no_prompt] = {'se': 1, 'c': 7.0, 'st': 50, 'sa': 'k_lms'}
  fake.skipped[f'part-000001/{no_prompt}'] = 'bad_json_entry'
  fake.notes['bad_entry_name'] = no_prompt
  number_prompt = _name(rng, 'png')
  files[number_prompt] = encode(random_image(rng))
  entries[number_prompt] = {'p': 123, 'se': 1}
  fake.skipped[f'part-000001/{number_prompt}'] = 'bad_json_entry'
  unlisted = _name(rng, 'png')
  files[unlisted] = encode(random_image(rng))
  fake.skipped[f'part-000001/{unlisted}'] = 'no_json_entry'
  ghost = _name(rng, 'png')
  entries[ghost] = _entry('an image that is not there', rng)
  fake.skipped[f'part-000001/{ghost}'] = 'missing_image'
  _write_part(images, 1, files, entries, zipped=True)

  # Part 2: the shared prompt again, and a byte copy of a part-1 image.
  files, entries = {}, {}
  for index in range(7):
    prompt = SHARED_PROMPT_VARIANT if index < 2 else _prompt(2, index)
    name = good(2, files, entries, prompt)
    if index == 3:
      fake.notes['image_nsfw_flagged_id'] = f'part-000002/{name}'
    if index == 4:
      fake.notes['metadata_prompt_differs_id'] = f'part-000002/{name}'
  copied_name, copied_bytes, copied_prompt = fake.notes['copied_image']
  duplicate = _name(rng, 'png')
  files[duplicate] = copied_bytes
  entries[duplicate] = _entry(copied_prompt, rng)
  fake.skipped[f'part-000002/{duplicate}'] = 'duplicate_image'
  metadata_rows.append(dict(image_name=duplicate, prompt=copied_prompt,
                            part_id=2, entry=entries[duplicate]))
  _write_part(images, 2, files, entries, zipped=True)

  # Part 3: unzipped.
  files, entries = {}, {}
  for index in range(6):
    name = good(3, files, entries, _prompt(3, index))
    if index == 0:
      fake.notes['unscored_id'] = f'part-000003/{name}'
    if index == 1:
      fake.notes['prompt_nsfw_id'] = f'part-000003/{name}'
  _write_part(images, 3, files, entries, zipped=False)

  # Part 4: its JSON does not parse.
  files = {_name(rng, 'png'): encode(random_image(rng)) for _ in range(3)}
  part4 = _write_part(images, 4, files, b'{"broken": ', zipped=True)
  fake.skipped_parts.append(str(part4))

  _write_metadata(root / 'metadata.parquet', metadata_rows, fake)
  fake.notes['large'] = _write_large(root, rng)
  return fake


def _write_large(root: pathlib.Path, rng: np.random.Generator) -> FakeAssets:
  """DiffusionDB Large: lossless WebP parts 1 (folder) and 10001 (zip)."""
  fake = FakeAssets(root)
  for folder, number, count, zipped in (
      ('diffusiondb-large-part-1', 1, 5, False),
      ('diffusiondb-large-part-2', 10001, 4, True)):
    files, entries = {}, {}
    for index in range(count):
      name = _name(rng, 'webp')
      files[name] = encode(random_image(rng), 'WEBP', lossless=True)
      prompt = _prompt(number, index)
      entries[name] = _entry(prompt, rng)
      fake.good_ids[f'part-{number:06d}/{name}'] = prompt
    _write_part(root / folder, number, files, entries, zipped=zipped)
  return fake


def _write_metadata(path: pathlib.Path, rows: list[dict],
                    fake: FakeAssets) -> None:
  """metadata.parquet with DiffusionDB's columns and dtypes."""
  # pylint: disable-next=g-import-not-at-top
  import pyarrow as pa
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  image_nsfw, prompt_nsfw, prompts = [], [], []
  for row in rows:
    row_id = f'part-{row["part_id"]:06d}/{row["image_name"]}'
    image_nsfw.append({fake.notes['image_nsfw_id']: 0.95,
                       fake.notes['image_nsfw_flagged_id']: 2.0,
                       fake.notes['unscored_id']: -1.0}.get(row_id, 0.1))
    prompt_nsfw.append(0.8 if row_id == fake.notes['prompt_nsfw_id'] else
                       0.05)
    prompts.append(row['prompt'] + ' (edited)'
                   if row_id == fake.notes['metadata_prompt_differs_id']
                   else row['prompt'])
  count = len(rows)
  start = datetime.datetime(2022, 8, 10, tzinfo=datetime.timezone.utc)
  table = pa.table({
      'image_name': pa.array([r['image_name'] for r in rows], pa.string()),
      'prompt': pa.array(prompts, pa.string()),
      'part_id': pa.array([r['part_id'] for r in rows], pa.uint16()),
      'seed': pa.array([r['entry']['se'] for r in rows], pa.uint32()),
      'step': pa.array([50] * count, pa.uint16()),
      'cfg': pa.array([7.0] * count, pa.float32()),
      'sampler': pa.array([8] * count, pa.uint8()),
      'width': pa.array([WIDTH] * count, pa.uint16()),
      'height': pa.array([HEIGHT] * count, pa.uint16()),
      'user_name': pa.array(['0' * 64] * count, pa.string()),
      'timestamp': pa.array([start + datetime.timedelta(minutes=i)
                             for i in range(count)],
                            pa.timestamp('us', tz='UTC')),
      'image_nsfw': pa.array(image_nsfw, pa.float32()),
      'prompt_nsfw': pa.array(prompt_nsfw, pa.float32()),
  })
  pq.write_table(table, path)


def write_image_folder(root: os.PathLike[str] | str,
                       seed: int = 1) -> FakeAssets:
  """A Kaggle-style folder: images/<imgId>.<ext> and prompts.csv.

  8 listed and good (PNG, JPEG, WebP; 3 share a prompt; one beside
  prompts.csv), 1 truncated, 1 listed with no image, 1 with an empty prompt,
  1 image not listed, 1 byte copy of the first image with another prompt.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  images = root / 'images'
  images.mkdir(parents=True)
  fake = FakeAssets(root)
  rows = []
  for index in range(8):
    image_id = f'{index:04x}a{rng.integers(1000)}'
    extension, kwargs = [('png', {}), ('jpg', {'quality': 95}),
                         ('webp', {'lossless': True})][index % 3]
    fmt = {'jpg': 'JPEG'}.get(extension, extension.upper())
    folder = root if index == 7 else images  # One beside prompts.csv.
    (folder / f'{image_id}.{extension}').write_bytes(
        encode(random_image(rng), fmt, **kwargs))
    prompt = (SHARED_PROMPT if index < 3 else
              f'photo {index}, "quoted", with, commas')
    rows.append((image_id, prompt))
    fake.good_ids[image_id] = prompt
  (images / 'bad0.png').write_bytes(truncated_png(rng))
  rows.append(('bad0', 'a corrupt image'))
  fake.skipped['bad0'] = 'corrupt_image'
  rows.append(('gone0', 'an image that is not there'))
  fake.skipped['gone0'] = 'missing_image'
  (images / 'blank0.png').write_bytes(encode(random_image(rng)))
  rows.append(('blank0', '  '))
  fake.skipped['blank0'] = 'empty_prompt'
  (images / 'extra0.png').write_bytes(encode(random_image(rng)))
  fake.skipped['extra0'] = 'no_prompt'
  first_id = rows[0][0]
  (images / 'copy0.png').write_bytes((images / f'{first_id}.png').read_bytes())
  rows.append(('copy0', 'a byte copy of the first image, another prompt'))
  fake.skipped['copy0'] = 'duplicate_image'
  # pylint: disable-next=g-import-not-at-top
  import csv
  with open(root / 'prompts.csv', 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['imgId', 'prompt'])
    writer.writerows(rows)
  return fake


def write_jsonl(root: os.PathLike[str] | str, seed: int = 2) -> FakeAssets:
  """prompts.jsonl naming images by relative and absolute paths.

  5 good (one by absolute path, 2 share a prompt), 1 line that is not JSON,
  1 entry without a prompt, 1 truncated image.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  (root / 'pics' / 'sub').mkdir(parents=True)
  fake = FakeAssets(root)
  lines = []
  for index in range(5):
    relative = f'pics/{"sub/" if index % 2 else ""}img{index}.png'
    (root / relative).write_bytes(encode(random_image(rng)))
    prompt = SHARED_PROMPT if index < 2 else f'jsonl prompt {index}'
    image = str(root / relative) if index == 4 else relative
    lines.append(json.dumps({'image': image, 'prompt': prompt}))
    fake.good_ids[image] = prompt
  lines.append('{"image": "pics/broken.png", "prompt": ')
  fake.skipped['prompts.jsonl:6'] = 'bad_json_entry'
  (root / 'pics' / 'noprompt.png').write_bytes(encode(random_image(rng)))
  lines.append(json.dumps({'image': 'pics/noprompt.png'}))
  fake.skipped['prompts.jsonl:7'] = 'bad_json_entry'
  (root / 'pics' / 'cut.png').write_bytes(truncated_png(rng))
  lines.append(json.dumps({'image': 'pics/cut.png', 'prompt': 'cut'}))
  fake.skipped['pics/cut.png'] = 'corrupt_image'
  (root / 'prompts.jsonl').write_text('\n'.join(lines) + '\n\n')
  return fake
