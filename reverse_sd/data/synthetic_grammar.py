"""Prompt grammar of the synthetic corpus: vocabulary, scene sampling, text.

A scene is 1-3 coloured shapes on a textured, coloured background in one
rendering style. Its prompt reads like a Stable Diffusion prompt: the visible
content, then (in varying order) the style and 0-8 modifiers that real prompts
carry but that leave no trace in the image ("trending on artstation", "8k").
The share of prompt words that are rendered therefore varies per example,
as the alignment between prompt and image does in DiffusionDB.

Sampling is a pure function of a numpy Generator, so one (seed, split, index)
always gives the same scene. Pixels are the renderer's job
(`synthetic_render`); this module only knows words.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

SHAPES: tuple[str, ...] = (
    'circle', 'square', 'triangle', 'star', 'hexagon',
    'diamond', 'cross', 'heart', 'ring', 'crescent',
)
COLOURS: tuple[str, ...] = (
    'red', 'orange', 'yellow', 'green', 'teal', 'blue',
    'purple', 'pink', 'brown', 'black', 'white', 'grey',
)
SIZES: tuple[str, ...] = ('small', 'medium', 'large')
# Reading order (top to bottom, left to right); objects are named in this
# order, so which object a prompt mentions first is visible in the image.
POSITIONS: tuple[str, ...] = (
    'top left', 'top', 'top right', 'center',
    'bottom left', 'bottom', 'bottom right',
)
TEXTURES: tuple[str, ...] = (
    'plain', 'striped', 'dotted', 'checkered', 'gradient',
)
STYLES: tuple[str, ...] = (
    'flat design', 'pixel art', 'blurred', 'outline sketch', 'film grain',
    'watercolor',
)
# Never rendered. None of them contains a word of the rendered vocabulary
# except "art" (as in "pixel art"), which real prompts share the same way.
MODIFIERS: tuple[str, ...] = (
    'trending on artstation', '8k', '4k', 'highly detailed', 'octane render',
    'concept art', 'by greg rutkowski', 'by alphonse mucha', 'by artgerm',
    'by wlop', 'by makoto shinkai', 'unreal engine', 'sharp focus',
    'digital painting', 'cinematic lighting', 'volumetric lighting',
    'dramatic lighting', 'studio lighting', 'intricate', 'elegant',
    'illustration', 'masterpiece', 'best quality', 'hyperrealistic',
    'photorealistic', 'matte painting', 'award winning', 'hdr', 'bokeh',
    'symmetrical', 'vibrant colors', 'cgsociety', 'fantasy',
    'epic composition', 'ray tracing', 'smooth', 'artstation hq',
    'deviantart', '4k wallpaper', 'ultra detailed',
)

DOMAINS: tuple[str, ...] = ('standard', 'shifted')
MAX_OBJECTS = 3
MAX_MODIFIERS = 8

# The shifted domain keeps the vocabulary and changes how often each style
# appears (and, in the renderer, the RGB shade behind each colour name).
STYLE_PROBABILITIES: dict[str, tuple[float, ...]] = {
    'standard': (0.30, 0.14, 0.14, 0.14, 0.14, 0.14),
    'shifted': (0.08, 0.12, 0.25, 0.10, 0.25, 0.20),
}

ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    'shape': SHAPES,
    'colour': COLOURS,
    'size': SIZES,
    'position': POSITIONS,
    'background_colour': COLOURS,
    'texture': TEXTURES,
    'style': STYLES,
}
_OBJECT_GROUPS = ('shape', 'colour', 'size', 'position')


def _attribute_names() -> tuple[str, ...]:
  """Names of the entries of `attribute_vector`, in order."""
  names = [f'count={n}' for n in range(1, MAX_OBJECTS + 1)]
  # Bag of object attributes (counts over the objects of a scene).
  for group in _OBJECT_GROUPS:
    names += [f'{group}={word}' for word in ATTRIBUTE_GROUPS[group]]
  # The same per object slot, slots in prompt (= reading) order.
  for slot in range(1, MAX_OBJECTS + 1):
    for group in _OBJECT_GROUPS:
      names += [f'object{slot}/{group}={word}'
                for word in ATTRIBUTE_GROUPS[group]]
  # Colour-shape bindings ("red star"), which a bag of words cannot express.
  names += [f'colour_shape={c} {s}' for c in COLOURS for s in SHAPES]
  for group in ('background_colour', 'texture', 'style'):
    names += [f'{group}={word}' for word in ATTRIBUTE_GROUPS[group]]
  return tuple(names)


ATTRIBUTE_NAMES: tuple[str, ...] = _attribute_names()
ATTRIBUTE_INDEX: dict[str, int] = {
    name: i for i, name in enumerate(ATTRIBUTE_NAMES)}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  colour: str
  size: str
  position: str


@dataclasses.dataclass(frozen=True)
class Scene:
  """One sampled example: what is drawn, how, and the prompt text."""

  objects: tuple[SceneObject, ...]  # Prompt order = reading order.
  background_colour: str
  texture: str
  style: str
  modifiers: tuple[str, ...]
  domain: str
  prompt: str
  rendered_prompt: str
  render_seed: int  # Nuisance variation in the renderer (jitter, noise).

  @property
  def alignment(self) -> float:
    """Share of prompt words that are rendered, in (0, 1]."""
    return len(words(self.rendered_prompt)) / len(words(self.prompt))


def words(text: str) -> list[str]:
  """Lower-case words of a prompt, punctuation dropped."""
  return re.findall(r'[a-z0-9]+', text.lower())


def _choice(rng: np.random.Generator, options: tuple[str, ...]) -> str:
  return options[int(rng.integers(len(options)))]


def _weighted_choice(rng: np.random.Generator, options: tuple[str, ...],
                     probabilities: tuple[float, ...]) -> str:
  threshold = rng.random() * sum(probabilities)
  index = int(np.searchsorted(np.cumsum(probabilities), threshold, 'right'))
  return options[min(index, len(options) - 1)]


def _distinct(rng: np.random.Generator, n: int, k: int) -> list[int]:
  """k distinct indices out of range(n), in sampled order."""
  return [int(i) for i in rng.permutation(n)[:k]]


def _object_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
  if obj.position == 'center':
    where = 'in the center'
  elif ' ' in obj.position:  # Corners read well with either preposition.
    where = f"{'in' if rng.random() < 0.3 else 'at'} the {obj.position}"
  else:
    where = f'at the {obj.position}'
  return f'a {obj.size} {obj.colour} {obj.shape} {where}'


def _join_objects(phrases: list[str]) -> str:
  if len(phrases) == 1:
    return phrases[0]
  return ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


def _background_phrase(colour: str, texture: str,
                       rng: np.random.Generator) -> str:
  if rng.random() < 0.5:
    described = f'{texture} {colour}'
  else:
    described = f'{colour} {texture}'
  return f"{'on' if rng.random() < 0.8 else 'with'} a {described} background"


def sample_scene(rng: np.random.Generator, domain: str = 'standard',
                 max_objects: int = MAX_OBJECTS) -> Scene:
  """Samples one scene and its prompt; a pure function of `rng`'s state.

  A scene has 1 to `max_objects` (at most MAX_OBJECTS) objects; the
  miniature loop's generator trains on one-object scenes.
  """
  if domain not in DOMAINS:
    raise ValueError(f'domain must be one of {DOMAINS}, got {domain!r}')
  if not 1 <= max_objects <= MAX_OBJECTS:
    raise ValueError(f'max_objects must be in [1, {MAX_OBJECTS}], got '
                     f'{max_objects!r}')
  background_colour = _choice(rng, COLOURS)
  texture = _choice(rng, TEXTURES)
  style = _weighted_choice(rng, STYLES, STYLE_PROBABILITIES[domain])

  num_objects = int(rng.integers(1, max_objects + 1))
  # Distinct positions, named in reading order; an object never has the
  # background's colour, so every object is visible.
  positions = sorted(_distinct(rng, len(POSITIONS), num_objects))
  object_colours = tuple(c for c in COLOURS if c != background_colour)
  objects = tuple(
      SceneObject(
          shape=_choice(rng, SHAPES),
          colour=_choice(rng, object_colours),
          size=_choice(rng, SIZES),
          position=POSITIONS[p],
      )
      for p in positions
  )
  num_modifiers = int(rng.integers(0, MAX_MODIFIERS + 1))
  modifiers = tuple(
      MODIFIERS[i] for i in _distinct(rng, len(MODIFIERS), num_modifiers)
  )

  content = [
      _join_objects([_object_phrase(o, rng) for o in objects]),
      _background_phrase(background_colour, texture, rng),
  ]
  # Word order varies a little: the style leads a quarter of the prompts and
  # some prompts open with one or two modifiers ("masterpiece, ...").
  rendered = [style] + content if rng.random() < 0.25 else content + [style]
  leading = 0
  if modifiers and rng.random() < 0.2:
    leading = int(rng.integers(1, 3))
  prompt_parts = [*modifiers[:leading], *rendered, *modifiers[leading:]]
  return Scene(
      objects=objects,
      background_colour=background_colour,
      texture=texture,
      style=style,
      modifiers=modifiers,
      domain=domain,
      prompt=', '.join(prompt_parts),
      rendered_prompt=', '.join(rendered),
      render_seed=int(rng.integers(2**32)),
  )


def attribute_vector(scene: Scene) -> np.ndarray:
  """Counts of the rendered attribute values, indexed by ATTRIBUTE_NAMES."""
  vector = np.zeros(len(ATTRIBUTE_NAMES), np.uint8)
  names = [f'count={len(scene.objects)}']
  for slot, obj in enumerate(scene.objects, start=1):
    for group in _OBJECT_GROUPS:
      value = getattr(obj, group)
      names += [f'{group}={value}', f'object{slot}/{group}={value}']
    names.append(f'colour_shape={obj.colour} {obj.shape}')
  names += [
      f'background_colour={scene.background_colour}',
      f'texture={scene.texture}',
      f'style={scene.style}',
  ]
  for name in names:
    vector[ATTRIBUTE_INDEX[name]] += 1
  return vector


def word_groups() -> dict[str, tuple[str, ...]]:
  """Prompt words by what they describe, each word in one group only.

  Object and background colours share their words, so they form one group;
  'art' belongs to the style group ("pixel art") though "concept art" also
  has it. `modifier` words are never drawn: a model should be at chance on
  them, which the per-group recall shows.
  """
  sources = {
      'shape': SHAPES, 'colour': COLOURS, 'size': SIZES,
      'position': POSITIONS, 'texture': TEXTURES, 'style': STYLES,
      'modifier': MODIFIERS,
  }
  seen = set()
  out = {}
  for group, phrases in sources.items():
    group_words = []
    for phrase in phrases:
      for word in words(phrase):
        if word not in seen:
          seen.add(word)
          group_words.append(word)
    out[group] = tuple(group_words)
  return out
