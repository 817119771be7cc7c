"""A trained run from Python: restore it, predict on images, read its metrics.

    import reverse_sd
    run = reverse_sd.load_run('runs/synthetic')          # latest checkpoint
    out = run.predict([pil_image, 'photo.png', array_HxWx3])
    out.embeddings, out.top_words[0], out.nearest_prompts[0]
    run.metrics()['test']['cosine'], run.curves()['train_loss']

`predict` takes PIL images, uint8 arrays [H, W, 3] (any size: they are
resized and cropped as in training) or image paths, and returns
`Predictions`: the unit-norm prompt embeddings [N, 384], the vocabulary
head's top words with their scores (empty lists without the head), and the
nearest prompts of a prompt bank with their cosines (the run's training
prompts unless `prompts=` gives others). `run.at_step(n)` is the same run at
another checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from PIL import Image

from reverse_sd import analyze
from reverse_sd import predict as predict_lib
from reverse_sd import saved_run
from reverse_sd import sharding
from reverse_sd.text import minilm
from reverse_sd.text import prompt_bank as prompt_bank_lib

ImageLike = Image.Image | np.ndarray | str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Predictions:
  """What a run predicts for N images, in input order.

  Attributes:
    embeddings: [N, 384] float32, unit norm: the predicted prompt embeddings.
    top_words: per image, [(word, score), ...] best first (empty without a
      vocabulary head).
    nearest_prompts: per image, [(prompt, cosine), ...] nearest first.
  """
  embeddings: np.ndarray
  top_words: list[list[tuple[str, float]]]
  nearest_prompts: list[list[tuple[str, float]]]


def _as_image(image: ImageLike) -> np.ndarray:
  """uint8 [H, W, 3] from a PIL image, an array or a path."""
  if isinstance(image, (str, os.PathLike)):
    return predict_lib.read_image(image)
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'))
  array = np.asarray(image)
  if array.ndim == 2:
    array = np.stack([array] * 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise ValueError(f'An image array must be [H, W, 3] (or RGBA), not '
                     f'{array.shape}.')
  if array.dtype != np.uint8:
    raise ValueError(f'An image array must be uint8 (0-255), not '
                     f'{array.dtype}.')
  return array[..., :3]


class TrainedRun:
  """A restored run (see the module docstring). Build it with `load_run`."""

  def __init__(self, run: saved_run.Run):
    self._run = run
    self._bank: prompt_bank_lib.PromptBank | None = None

  @property
  def workdir(self) -> pathlib.Path:
    return self._run.workdir

  @property
  def config(self):
    """The run's config (config.json)."""
    return self._run.config

  @property
  def step(self) -> int:
    """The checkpoint step of the parameters in use."""
    return self._run.step

  @property
  def steps(self) -> tuple[int, ...]:
    """Every checkpointed step in the workdir."""
    return self._run.steps

  @property
  def restored(self) -> saved_run.Run:
    """The underlying `saved_run.Run` (model, params, mesh, predict step)."""
    return self._run

  def at_step(self, step: int) -> TrainedRun:
    """The same run with the parameters of checkpoint `step`."""
    other = TrainedRun(self._run.at_step(step))
    other._bank = self._bank  # pylint: disable=protected-access
    return other

  def _prompt_bank(self, prompts: Sequence[str] | None
                   ) -> prompt_bank_lib.PromptBank:
    if prompts is None:
      if self._bank is None:
        self._bank = predict_lib.training_prompt_bank(self._run)
      return self._bank
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    if not prompts:
      raise ValueError('prompts= holds no prompt.')
    text = self._run.config.text
    encoder = minilm.SentenceEncoder(text.model_dir or None,
                                     batch_size=text.batch_size)
    return prompt_bank_lib.PromptBank.from_table(
        prompts, np.asarray(encoder.encode(prompts), np.float32),
        source='prompts passed to predict')

  def predict(self, images: Sequence[ImageLike] | ImageLike, *,
              top_k: int = 10, num_prompts: int = 5,
              prompts: Sequence[str] | None = None) -> Predictions:
    """Predicts the prompt of each image.

    Args:
      images: one image or a sequence of PIL images, uint8 [H, W, 3] arrays
        or paths.
      top_k: top words per image (vocabulary head).
      num_prompts: nearest prompts per image (0: none).
      prompts: the prompt bank to search (embedded with the run's MiniLM);
        default: the run's training prompts.

    Returns:
      `Predictions` in input order.
    """
    if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
      images = [images]
    predict_lib.check_predicts_new_images(self._run)
    inputs = np.stack([self._run.prepare_image(_as_image(image))
                       for image in images]) if images else None
    if inputs is None:
      raise ValueError('predict() needs at least one image.')
    multiple = saved_run.data_batch_multiple(self._run)
    batch = -(-len(inputs) // multiple) * multiple
    padded = np.zeros((batch, *inputs.shape[1:]), np.uint8)
    padded[:len(inputs)] = inputs
    outputs = self._run.predict_step(
        self._run.params,
        sharding.host_to_global({'image': padded}, self._run.mesh))
    outputs = {k: np.asarray(jax.device_get(v))[:len(inputs)]
               for k, v in outputs.items()}
    embeddings = outputs['embedding'].astype(np.float32)
    words = [[] for _ in embeddings]
    if 'word_logits' in outputs and self._run.vocabulary is not None:
      words = [[(w['word'], w['score']) for w in predict_lib.top_words(
          logits, self._run.vocabulary.words, top_k)]
               for logits in outputs['word_logits']]
    nearest = [[] for _ in embeddings]
    if num_prompts:
      bank = self._prompt_bank(prompts)
      rows, cosines = bank.nearest(embeddings, num_prompts)
      nearest = [[(str(bank.prompts[r]), float(c)) for r, c in zip(rr, cc)]
                 for rr, cc in zip(rows, cosines)]
    return Predictions(embeddings, words, nearest)

  def metrics(self) -> dict[str, Any]:
    """The final evaluation (results.json): split -> scores, and the run's
    summary fields; raises FileNotFoundError before the run has finished."""
    path = self.workdir / 'results.json'
    if not path.is_file():
      raise FileNotFoundError(
          f'{path} does not exist: the run in {self.workdir} has not '
          'finished (results.json is written after the last evaluation).')
    return json.loads(path.read_text())

  def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Training and evaluation curves from the TensorBoard events:
    tag -> (steps, values)."""
    return analyze.read_scalar_curves(self.workdir)


def load_run(workdir: str | os.PathLike, step: int | None = None
             ) -> TrainedRun:
  """Restores the run in `workdir` at `step` (default: the latest
  checkpoint); see the module docstring."""
  return TrainedRun(saved_run.restore_run(workdir, step))
