r"""Predicts prompts for images with a trained run: embedding, words, prompts.

  python -m reverse_sd.predict --workdir=RUN_DIR [--step=N] \
      [--prompt_bank=prompts.txt] [--top_k=10] [--num_prompts=5] \
      [--output=preds.jsonl] [--embeddings_out=emb.npz] IMAGE_OR_DIR ...

Each image (a file, or every image under a folder, recursively) is resized
to the model's input as in training and run through the restored model in
padded batches; only one batch of images is held at a time. One JSON line
per image goes to --output (default stdout), in input order:

  {"path": ..., "embedding_file": "emb.npz", "row": 3,
   "top_words": [{"word": "red", "score": 0.93}, ...],        # vocab head
   "nearest_prompts": [{"prompt": "...", "cosine": 0.81}, ...]}

The embedding of row i is `np.load(embedding_file)['embedding'][i]` (rows of
images that failed are zero and `ok[i]` is False). The nearest prompts come
from the run's training prompts, or from --prompt_bank (a text file, one
prompt per line, embedded with the run's MiniLM once and cached beside it).

An image that cannot be read, or has more than --max_pixels pixels (a
decompression bomb), gets `{"path": ..., "error": ...}` and the others are
still predicted; the exit status is then PARTIAL_FAILURE_EXIT_CODE. No image
at all, or a bad workdir, is an error with status 1 before anything runs.

A white-box run with sd_context='caption' is refused: its model reads the SD
text encoder's context of each image's own prompt, which a new image does not
have (analyze.py still evaluates it on the stored splits).
"""

from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import contextlib
import json
import logging
import os
import pathlib
import sys
import time
import warnings
import zipfile

import jax
import numpy as np
from PIL import Image

from reverse_sd import saved_run
from reverse_sd import sharding
from reverse_sd.data import datasets
from reverse_sd.data import preprocess
from reverse_sd.models import reverse_model
from reverse_sd.models import whitebox
from reverse_sd.ops.cpu import tuning
from reverse_sd.text import minilm
from reverse_sd.text import prompt_bank as prompt_bank_lib

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif',
                    '.tiff')
# 8192 x 8192: far above Stable Diffusion sizes, far below a bomb's.
DEFAULT_MAX_PIXELS = 8192 * 8192
PARTIAL_FAILURE_EXIT_CODE = 2


class NoImagesError(ValueError):
  """The inputs name no image file."""


def find_images(inputs: Sequence[str | os.PathLike[str]]
                ) -> list[pathlib.Path]:
  """Image files named by `inputs`: files as given, folders searched
  recursively for IMAGE_EXTENSIONS (sorted). Paths that do not exist are
  kept, so that they get an error line of their own.

  Raises:
    NoImagesError: nothing to predict (e.g. only empty folders).
  """
  found = []
  for item in inputs:
    path = pathlib.Path(item)
    if path.is_dir():
      found.extend(sorted(
          p for p in path.rglob('*')
          if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
    else:
      found.append(path)
  if not found:
    raise NoImagesError(
        f'No images to predict in {[str(i) for i in inputs]}: folders are '
        f'searched recursively for {", ".join(IMAGE_EXTENSIONS)} files.')
  return found


def read_image(path: str | os.PathLike[str], *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes an image file to uint8 (H, W, 3), refusing oversized ones.

  The size is read from the header and checked against `max_pixels` before
  any pixel is decoded, so a decompression bomb costs no memory. (PIL's own
  limit, `Image.MAX_IMAGE_PIXELS`, still applies; the command line raises it
  to --max_pixels.)

  Raises:
    ValueError: unreadable, corrupt, or over `max_pixels`; names the file.
    FileNotFoundError: `path` does not exist.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such file.')
  try:
    with Image.open(path) as image:  # Reads the header only.
      width, height = image.size
  except Image.DecompressionBombError:
    width = height = None  # Over PIL's own limit: reported below.
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise ValueError(f'{path}: not a readable image ({type(e).__name__}: '
                     f'{e}).') from e
  if width is None or width * height > max_pixels:
    size = 'more than PIL allows' if width is None else (
        f'{width}x{height} = {width * height}')
    raise ValueError(f'{path}: {size} pixels, over the limit of {max_pixels} '
                     '(--max_pixels); refusing to decode a possible '
                     'decompression bomb.')
  return preprocess.load_image(path)


def top_words(word_logits_V: np.ndarray, words: Sequence[str],
              k: int) -> list[dict]:
  """The k most likely words with sigmoid scores; ties: lower index first."""
  scores = 1.0 / (1.0 + np.exp(-np.asarray(word_logits_V, np.float64)))
  order = np.argsort(-scores, kind='stable')[:k]
  return [{'word': words[i], 'score': round(float(scores[i]), 5)}
          for i in order]


class EmbeddingWriter:
  """Streams embedding rows to disk; `close` writes one .npz atomically.

  Rows go to a memory-mapped .npy beside the output, which is then stored
  into the .npz archive by file, so no more than a batch is ever in memory.
  The archive holds 'embedding' [N, D] float32, 'paths' [N], 'ok' [N] bool
  and 'step'.
  """

  def __init__(self, path: str | os.PathLike[str], num_rows: int):
    self.path = pathlib.Path(path)
    if self.path.suffix != '.npz':
      raise ValueError(f'--embeddings_out={self.path} must end in .npz.')
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._rows_path = self.path.with_name(
        f'{self.path.name}.rows-{os.getpid()}.npy')
    self._rows = None  # Made on the first write, when D is known.
    self.ok = np.zeros(num_rows, bool)

  def write(self, row: int, embedding_D: np.ndarray) -> None:
    if self._rows is None:
      self._rows = np.lib.format.open_memmap(
          self._rows_path, mode='w+', dtype=np.float32,
          shape=(len(self.ok), len(embedding_D)))
    self._rows[row] = embedding_D
    self.ok[row] = True

  def close(self, paths: Sequence[str], step: int) -> None:
    """Writes the .npz (rows of failed images are zero)."""
    if self._rows is None:  # Nothing was predicted.
      self._rows = np.lib.format.open_memmap(
          self._rows_path, mode='w+', dtype=np.float32,
          shape=(len(self.ok), 0))
    self._rows.flush()
    self._rows = None  # Closes the memory map.
    tmp = self.path.with_name(f'{self.path.name}.tmp-{os.getpid()}')
    try:
      with zipfile.ZipFile(tmp, 'w', allowZip64=True) as archive:
        archive.write(self._rows_path, 'embedding.npy')
        for name, value in (('paths', np.asarray(paths, dtype=str)),
                            ('ok', self.ok), ('step', np.int64(step))):
          with archive.open(f'{name}.npy', 'w', force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(value),
                                      allow_pickle=False)
      os.replace(tmp, self.path)
    finally:
      tmp.unlink(missing_ok=True)
      self._rows_path.unlink(missing_ok=True)

  def abort(self) -> None:
    """Removes the partial rows; the .npz is left as it was."""
    self._rows = None
    self._rows_path.unlink(missing_ok=True)


def check_predicts_new_images(run: saved_run.Run) -> None:
  """Raises ValueError when the run's model cannot predict an image alone.

  A white-box model with sd_context='caption' reads the SD text encoder's
  context of the image's own prompt: the very thing to be predicted, which a
  new image does not come with.
  """
  model_config = run.config.model
  if model_config.get('sd_context', 'empty') == whitebox.CAPTION and (
      model_config.backbone == reverse_model.WHITEBOX):
    raise ValueError(
        f'The run in {run.workdir} has config.model.sd_context=\'caption\':'
        " its U-Net is conditioned on each image's own prompt (the SD text "
        'encoder on the caption), which new images do not have and which is '
        'what predict is asked to find. Such a run is an upper-bound '
        'analysis setting; evaluate it on its stored splits with '
        'reverse_sd.analyze, or predict with a run trained with '
        "sd_context='empty' (configs/diffusiondb_unet.py: context=empty).")


class Predictor:
  """Images -> prediction records with a restored run, batch by batch."""

  def __init__(self, run: saved_run.Run, *, batch_size: int = 0,
               bank: prompt_bank_lib.PromptBank | None = None,
               top_k: int = 10, num_prompts: int = 5,
               max_pixels: int = DEFAULT_MAX_PIXELS, num_workers: int = 4):
    check_predicts_new_images(run)
    multiple = saved_run.data_batch_multiple(run)
    batch_size = batch_size or int(run.config.eval.batch_size)
    # Round up to a multiple of the devices of the data axis.
    self.batch_size = -(-batch_size // multiple) * multiple
    self.run = run
    self.bank = bank
    self.top_k = top_k
    self.num_prompts = num_prompts if bank is not None else 0
    self.max_pixels = max_pixels
    self.num_workers = max(1, num_workers)

  def _load(self, path: pathlib.Path) -> np.ndarray | str:
    """The model input of one image, or the error message."""
    try:
      return self.run.prepare_image(read_image(path,
                                               max_pixels=self.max_pixels))
    except (OSError, ValueError) as e:  # Messages that name the file.
      return str(e)
    except Exception as e:  # pylint: disable=broad-except
      # Whatever else a decoder raises: one bad image must not stop the rest.
      return f'{path}: cannot be read ({type(e).__name__}: {e}).'

  def _dispatch(self, images: list[np.ndarray | str]):
    """Starts the model on the readable images of a batch (asynchronously)."""
    batch = np.zeros((self.batch_size, *self.run.input_shape), np.uint8)
    ok = [i for i, image in enumerate(images) if not isinstance(image, str)]
    if not ok:
      return None
    for i in ok:
      batch[i] = images[i]
    inputs = sharding.host_to_global({'image': batch}, self.run.mesh)
    return self.run.predict_step(self.run.params, inputs)

  def predict(self, paths: Sequence[pathlib.Path], *,
              embeddings: EmbeddingWriter | None = None,
              progress: Callable[[int, int, int], None] | None = None
              ) -> Iterator[dict]:
    """Yields one record per path, in order (see the module docstring)."""
    done = errors = 0
    for batch_paths, records in self._batches(paths, embeddings):
      for record in records:
        errors += 'error' in record
        yield record
      done += len(batch_paths)
      if progress:
        progress(done, len(paths), errors)

  def _batches(self, paths, embeddings):
    """Yields (paths, records) batch by batch; while the devices run one
    batch, the next one is read."""
    pending = None
    with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
      for start in range(0, len(paths), self.batch_size):
        batch_paths = paths[start:start + self.batch_size]
        images = list(pool.map(self._load, batch_paths))
        current = (start, batch_paths, images, self._dispatch(images))
        if pending is not None:
          yield pending[1], self._records(*pending, embeddings)
        pending = current
    if pending is not None:
      yield pending[1], self._records(*pending, embeddings)

  def _records(self, start, batch_paths, images, outputs,
               embeddings: EmbeddingWriter | None) -> Iterator[dict]:
    outputs = ({} if outputs is None else
               {k: np.asarray(jax.device_get(v)) for k, v in outputs.items()})
    emb = outputs.get('embedding')
    nearest = None
    if emb is not None and self.num_prompts:
      nearest = self.bank.nearest(emb[:len(batch_paths)], self.num_prompts)
    for i, (path, image) in enumerate(zip(batch_paths, images)):
      if isinstance(image, str):
        yield {'path': str(path), 'error': image}
        continue
      record = {'path': str(path), 'row': start + i}
      if embeddings is not None:
        embeddings.write(start + i, emb[i])
        record['embedding_file'] = str(embeddings.path)
      if 'word_logits' in outputs and self.run.vocabulary is not None:
        record['top_words'] = top_words(outputs['word_logits'][i],
                                        self.run.vocabulary.words, self.top_k)
      if nearest is not None:
        rows, cosines = nearest
        record['nearest_prompts'] = [
            {'prompt': str(self.bank.prompts[r]), 'cosine': round(float(c), 5)}
            for r, c in zip(rows[i], cosines[i])]
      yield record


def training_prompt_bank(run: saved_run.Run) -> prompt_bank_lib.PromptBank:
  """The run's training prompts and their target embeddings."""
  try:
    train = datasets.load_splits(run.config, ['train'])['train']
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        'Cannot read the training prompts of the run in '
        f'{run.workdir} (config.data.data_dir='
        f'{run.config.data.data_dir!r}) for the default prompt bank: '
        f'{type(e).__name__}: {e}. Pass --prompt_bank=FILE (one prompt per '
        'line), or --num_prompts=0.') from e
  return prompt_bank_lib.PromptBank.from_table(
      train.table.prompts, train.table.embeddings,
      source=f'training prompts of {run.workdir}')


def text_file_prompt_bank(run: saved_run.Run,
                          path: str | os.PathLike[str]
                          ) -> prompt_bank_lib.PromptBank:
  """Prompts of a text file, embedded with the run's target encoder."""
  text = run.config.text
  model_dir = (pathlib.Path(text.model_dir) if text.model_dir
               else minilm.default_model_dir())
  return prompt_bank_lib.PromptBank.from_text_file(
      path, lambda: minilm.SentenceEncoder(model_dir,
                                           batch_size=text.batch_size),
      encoder_tag=str(model_dir.resolve()))


class _ProgressLine:
  """'predict: 96/1000 images, 1 error, 31.0/s' on stderr every few seconds.
  """

  def __init__(self, every_secs: float = 5.0):
    self._start = self._last = time.time()
    self._every = every_secs

  def __call__(self, done: int, total: int, errors: int) -> None:
    now = time.time()
    if now - self._last < self._every and done < total:
      return
    self._last = now
    logging.info('predict: %d/%d images, %d error(s), %.1f/s', done, total,
                 errors, done / max(now - self._start, 1e-9))


def predict_to_files(run: saved_run.Run, paths: Sequence[pathlib.Path], *,
                     output: str = '', embeddings_out: str = '',
                     prompt_bank: str = '', top_k: int = 10,
                     num_prompts: int = 5, batch_size: int = 0,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
  """The command line's work: writes the JSON lines (and embeddings) of the
  images `paths` (see `find_images`).

  Returns:
    {'images', 'predicted', 'errors', 'output', 'embeddings_out'}.

  Raises:
    ValueError: the run cannot predict new images
      (`check_predicts_new_images`), before any prompt bank is built.
  """
  check_predicts_new_images(run)
  bank = None
  if num_prompts > 0:
    bank = (text_file_prompt_bank(run, prompt_bank) if prompt_bank
            else training_prompt_bank(run))
  predictor = Predictor(run, batch_size=batch_size, bank=bank, top_k=top_k,
                        num_prompts=num_prompts, max_pixels=max_pixels)
  writer = None
  if embeddings_out:
    writer = EmbeddingWriter(embeddings_out, len(paths))
  errors = 0
  with contextlib.ExitStack() as stack:
    if output:
      pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
      sink = stack.enter_context(open(output, 'w', encoding='utf-8'))
    else:
      sink = sys.stdout
    try:
      for record in predictor.predict(paths, embeddings=writer,
                                      progress=_ProgressLine()):
        errors += 'error' in record
        sink.write(json.dumps(record) + '\n')
        sink.flush()
    except BaseException:
      if writer is not None:
        writer.abort()
      raise
  if writer is not None:
    writer.close([str(p) for p in paths], run.step)
  return {'images': len(paths), 'predicted': len(paths) - errors,
          'errors': errors, 'output': output or '<stdout>',
          'embeddings_out': embeddings_out or None}


def _main(argv: Sequence[str]) -> None:
  inputs = argv[1:]
  if not inputs:
    raise SystemExit('usage: python -m reverse_sd.predict --workdir=RUN_DIR '
                     '[flags] IMAGE_OR_DIR ...')
  tuning.tune_process()
  # --max_pixels decides; PIL's limit must not refuse what it allows.
  Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, _FLAGS.max_pixels)
  warnings.simplefilter('ignore', Image.DecompressionBombWarning)
  try:
    paths = find_images(inputs)  # Fails fast, before restoring the model.
    run = saved_run.restore_run(_FLAGS.workdir,
                           None if _FLAGS.step < 0 else _FLAGS.step)
    summary = predict_to_files(
        run, paths, output=_FLAGS.output,
        embeddings_out=_FLAGS.embeddings_out, prompt_bank=_FLAGS.prompt_bank,
        top_k=_FLAGS.top_k, num_prompts=_FLAGS.num_prompts,
        batch_size=_FLAGS.batch_size, max_pixels=_FLAGS.max_pixels)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'predict: error: {e}') from e
  logging.info('predict: done: %s', json.dumps(summary))
  if summary['errors']:
    sys.exit(PARTIAL_FAILURE_EXIT_CODE)


if __name__ == '__main__':
  from reverse_sd import cli as _cli  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string('workdir', None, 'A trained run.', required=True)
  _flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the latest).')
  _flags.DEFINE_string('prompt_bank', '',
                       'Text file, one prompt per line (default: the run\'s '
                       'training prompts).')
  _flags.DEFINE_integer('top_k', 10, 'Vocabulary words per image.',
                        lower_bound=1)
  _flags.DEFINE_integer('num_prompts', 5,
                        'Nearest prompts per image (0: none).', lower_bound=0)
  _flags.DEFINE_string('output', '', 'JSON lines file (default: stdout).')
  _flags.DEFINE_string('embeddings_out', '',
                       '.npz for the embeddings (default: not saved).')
  _flags.DEFINE_integer('batch_size', 0,
                        'Images per batch (0: the run\'s eval batch size).',
                        lower_bound=0)
  _flags.DEFINE_integer('max_pixels', DEFAULT_MAX_PIXELS,
                        'Images with more pixels are refused unread.',
                        lower_bound=1)
  _FLAGS = _flags.FLAGS
  _cli.run(_main)
