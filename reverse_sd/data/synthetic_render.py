"""Renders a `synthetic_grammar.Scene` to an RGB image with numpy and PIL.

Deterministic: the pixels depend only on the scene (including its
`render_seed`, which drives position jitter, texture variants and noise) and
the image size. Scenes are drawn at twice the target size and box-filtered
down, which antialiases edges at little cost. The style is applied last, at
the target size, so it degrades an image the same way at 32, 64 or 224 px.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from reverse_sd.data import synthetic_grammar as grammar

# Colour names to RGB. The shifted domain uses other shades of the same names
# (duller, darker or paler) so that a model sees a palette shift at test time.
PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    'standard': {
        'red': (220, 30, 35), 'orange': (245, 140, 20),
        'yellow': (240, 220, 30), 'green': (40, 170, 60),
        'teal': (0, 150, 150), 'blue': (30, 70, 220),
        'purple': (130, 50, 190), 'pink': (245, 125, 190),
        'brown': (125, 75, 30), 'black': (20, 20, 20),
        'white': (245, 245, 245), 'grey': (128, 128, 128),
    },
    'shifted': {
        'red': (175, 45, 70), 'orange': (215, 115, 65),
        'yellow': (205, 190, 85), 'green': (95, 145, 70),
        'teal': (65, 130, 125), 'blue': (75, 95, 170),
        'purple': (150, 95, 165), 'pink': (215, 155, 175),
        'brown': (150, 105, 70), 'black': (50, 45, 60),
        'white': (228, 222, 205), 'grey': (150, 145, 135),
    },
}
# Radius as a share of the image side; centres of the 7 positions.
_RADIUS = {'small': 0.10, 'medium': 0.15, 'large': 0.20}
_CENTRE = {
    'top left': (0.24, 0.24), 'top': (0.5, 0.24), 'top right': (0.76, 0.24),
    'center': (0.5, 0.5),
    'bottom left': (0.24, 0.76), 'bottom': (0.5, 0.76),
    'bottom right': (0.76, 0.76),
}
_JITTER = 0.03  # Of the image side.
# Small enough that a square never looks like a diamond.
_MAX_ROTATION_DEG = 15.0
_RING_THICKNESS = 0.38  # Of the radius.
_SUPERSAMPLE = 2
_TEXTURE_PERIOD = 1 / 8  # Of the image side.
_TEXTURE_CONTRAST = 0.35
_GRADIENT_CONTRAST = 0.55


def _regular(n: int, radius: float, start_deg: float) -> np.ndarray:
  angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
  return radius * np.stack([np.cos(angles), np.sin(angles)], -1)


def _star() -> np.ndarray:
  outer = _regular(5, 1.1, -90)
  inner = _regular(5, 0.45, -90 + 36)
  return np.stack([outer, inner], 1).reshape(-1, 2)


def _cross() -> np.ndarray:
  a, b = 0.33, 0.95
  return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                   (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)])


def _heart() -> np.ndarray:
  t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
  x = 16 * np.sin(t) ** 3
  y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
  return np.stack([x, y + 2.5], -1) / 15.0


def _crescent() -> np.ndarray:
  # Unit disc minus a disc of radius 0.8 centred at (0.5, 0): the outer arc
  # runs through the left, the inner arc back; shifted to centre the mass.
  d, rho = 0.5, 0.8
  x = (1 - rho**2 + d**2) / (2 * d)
  phi = np.arctan2(np.sqrt(1 - x**2), x)
  psi = np.arctan2(np.sqrt(1 - x**2), x - d)
  outer = np.linspace(phi, 2 * np.pi - phi, 32)
  inner = np.linspace(2 * np.pi - psi, psi, 24)
  points = np.concatenate([
      np.stack([np.cos(outer), np.sin(outer)], -1),
      np.stack([d + rho * np.cos(inner), rho * np.sin(inner)], -1),
  ])
  return (points + [0.3, 0.0]) * 1.1


# Polygons in units of the radius, y pointing down. Circle and ring are
# drawn as ellipses.
_POLYGONS: dict[str, np.ndarray] = {
    'square': np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * 0.85,
    'triangle': _regular(3, 1.15, -90) + [0.0, 0.15],
    'star': _star(),
    'hexagon': _regular(6, 1.0, 0),
    'diamond': _regular(4, 1.1, -90),
    'cross': _cross(),
    'heart': _heart(),
    'crescent': _crescent(),
}
assert set(_POLYGONS) | {'circle', 'ring'} == set(grammar.SHAPES)
assert all(set(p) == set(grammar.COLOURS) for p in PALETTES.values())
assert set(PALETTES) == set(grammar.DOMAINS)


def _shade(rgb: np.ndarray, amount: float) -> np.ndarray:
  """Moves a colour toward white if it is dark, toward black if it is light."""
  target = 0.0 if rgb @ [0.299, 0.587, 0.114] > 110 else 255.0
  return rgb + amount * (target - rgb)


@functools.lru_cache(maxsize=256)
def _texture_mask(texture: str, variant: int, side: int,
                  scale: int) -> Image.Image:
  """Weight of the secondary background colour, a (side, side) 'L' image.

  `side` is the drawing resolution and `scale` the supersampling factor;
  periods are in output pixels so a texture looks the same at every size.
  """
  coords = (np.arange(side, dtype=np.float32) + 0.5) / scale
  y, x = np.meshgrid(coords, coords, indexing='ij')
  period = max(4.0, side / scale * _TEXTURE_PERIOD)
  if texture == 'plain':
    mask = np.zeros_like(x)
  elif texture == 'striped':
    along = (y, x, (x + y) / np.sqrt(2), (x - y) / np.sqrt(2))[variant % 4]
    mask = np.floor(along / (period / 2)) % 2
  elif texture == 'dotted':
    offset = variant % 2 * period / 2
    dy = (y + offset) % period - period / 2
    dx = (x + offset) % period - period / 2
    mask = (dx**2 + dy**2) < (0.25 * period) ** 2
  elif texture == 'checkered':
    mask = (np.floor(x / period) + np.floor(y / period)) % 2
  elif texture == 'gradient':
    extent = side / scale
    along = (x, y, extent - x, extent - y)[variant % 4]
    mask = along / extent
  else:
    raise ValueError(f'unknown texture {texture!r}; expected one of '
                     f'{grammar.TEXTURES}')
  return Image.fromarray(np.round(255 * mask).astype(np.uint8), mode='L')


def _background(scene: grammar.Scene, palette, side: int, scale: int,
                variant: int) -> Image.Image:
  primary = np.asarray(palette[scene.background_colour], np.float32)
  contrast = (_GRADIENT_CONTRAST if scene.texture == 'gradient'
              else _TEXTURE_CONTRAST)
  secondary = _shade(primary, contrast)
  mask = _texture_mask(scene.texture, variant, side, scale)
  return Image.composite(
      Image.new('RGB', (side, side), tuple(int(round(c)) for c in secondary)),
      Image.new('RGB', (side, side), tuple(int(c) for c in primary)),
      mask)


def _draw_object(draw: ImageDraw.ImageDraw, obj: grammar.SceneObject, palette,
                 side: int, line_width: int, outline_only: bool,
                 rng: np.random.Generator) -> None:
  colour = palette[obj.colour]
  jitter = rng.uniform(-_JITTER, _JITTER, 2)
  centre = (np.asarray(_CENTRE[obj.position]) + jitter) * side
  radius = _RADIUS[obj.size] * side * rng.uniform(0.92, 1.08)
  angle = np.deg2rad(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
  mirror = 1.0 if rng.random() < 0.5 else -1.0
  cx, cy = centre
  if obj.shape in ('circle', 'ring'):
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if obj.shape == 'circle':
      if outline_only:
        draw.ellipse(box, outline=colour, width=line_width)
      else:
        draw.ellipse(box, fill=colour)
    elif outline_only:
      inner = radius * (1 - _RING_THICKNESS)
      draw.ellipse(box, outline=colour, width=line_width)
      draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner],
                   outline=colour, width=line_width)
    else:
      thickness = max(1, round(_RING_THICKNESS * radius))
      draw.ellipse(box, outline=colour, width=thickness)
    return
  cos, sin = np.cos(angle), np.sin(angle)
  rotation = np.array([[cos * mirror, sin * mirror], [-sin, cos]])
  points = _POLYGONS[obj.shape] @ rotation * radius + centre
  xy = points.ravel().tolist()
  if outline_only:
    draw.polygon(xy, outline=colour, width=line_width)
  else:
    draw.polygon(xy, fill=colour)


def _apply_style(image: Image.Image, style: str,
                 rng: np.random.Generator) -> Image.Image:
  """Degrades the image the way `style` says (outlines are drawn, not here)."""
  size = image.width
  if style in ('flat design', 'outline sketch'):
    return image
  if style == 'pixel art':
    block = max(2, round(size / 16))
    small = image.resize((max(1, size // block),) * 2, Image.Resampling.BOX)
    pixels = small.resize((size, size), Image.Resampling.NEAREST)
    return ImageOps.posterize(pixels, 3)  # 8 levels per channel.
  if style == 'blurred':
    return image.filter(ImageFilter.GaussianBlur(size / 40))
  if style == 'film grain':
    pixels = np.asarray(image, np.float32)
    # Mostly luminance grain with a little colour noise.
    grain = (rng.normal(0.0, 20.0, (size, size, 1)) +
             rng.normal(0.0, 6.0, (size, size, 3)))
    return Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
  if style == 'watercolor':
    # Soft edges, pale paper showing through, low-frequency pigment blotches.
    soft = image.filter(ImageFilter.GaussianBlur(size / 64))
    pixels = np.asarray(soft, np.float32)
    cells = max(2, size // 8)
    noise = rng.normal(0.0, 14.0, (cells, cells)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(noise).resize(
        (size, size), Image.Resampling.BILINEAR))
    pixels = 0.8 * pixels + 0.2 * 255.0 + blotches[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  raise ValueError(f'unknown style {style!r}; expected one of '
                   f'{grammar.STYLES}')


def _check_size(image_size: int) -> None:
  if image_size < 16:
    raise ValueError(f'image_size must be at least 16 px, got {image_size}')


def _draw_objects(canvas: Image.Image, scene: grammar.Scene, palette,
                  rng: np.random.Generator) -> None:
  """Draws the objects on the supersampled `canvas`, larger ones first, so a
  small one is never hidden behind a large one."""
  side = canvas.width
  draw = ImageDraw.Draw(canvas)
  outline_only = scene.style == 'outline sketch'
  line_width = max(_SUPERSAMPLE, round(side / 36))
  for obj in sorted(scene.objects, key=lambda o: -_RADIUS[o.size]):
    _draw_object(draw, obj, palette, side, line_width, outline_only, rng)


def render(scene: grammar.Scene, image_size: int = 64) -> np.ndarray:
  """Draws `scene` as a uint8 (image_size, image_size, 3) array."""
  _check_size(image_size)
  rng = np.random.default_rng(scene.render_seed)
  side = image_size * _SUPERSAMPLE
  # The draws from `rng` come in this order (`object_mask` replays them).
  variant = int(rng.integers(4))
  canvas = _background(scene, PALETTES[scene.domain], side, _SUPERSAMPLE,
                       variant)
  _draw_objects(canvas, scene, PALETTES[scene.domain], rng)
  image = canvas.reduce(_SUPERSAMPLE)
  return np.asarray(_apply_style(image, scene.style, rng))


def object_mask(scene: grammar.Scene, image_size: int = 64) -> np.ndarray:
  """The share of each pixel that `render` covers with an object, a float32
  (image_size, image_size) array in [0, 1]: the renderer's own segmentation,
  drawn before the style (a blur or grain does not move it)."""
  _check_size(image_size)
  rng = np.random.default_rng(scene.render_seed)
  side = image_size * _SUPERSAMPLE
  _ = int(rng.integers(4))  # `render`'s background variant.
  canvas = Image.new('L', (side, side), 0)
  _draw_objects(canvas, scene, {colour: 255 for colour in grammar.COLOURS},
                rng)
  return np.asarray(canvas.reduce(_SUPERSAMPLE), np.float32) / 255.0


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 RGB array (fast compression; PNG is lossless)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()
