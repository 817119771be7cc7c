"""Image preprocessing: decode, resize, crop and pad, as typed numpy functions.

Images are uint8 numpy arrays of shape (height, width, 3) throughout. The
TFDS builders store fixed-size images made by `resize_and_crop`; CLIP-style
towers use `clip_preprocess` (their mean/std normalisation is in the model).

    image = load_image('part-000001/abc.png')        # (512, 512, 3) uint8
    stored = resize_and_crop(image, 256, 'center_crop')  # (256, 256, 3)
"""

from __future__ import annotations

import io
import os
from typing import Literal

import numpy as np
from PIL import Image

ResizeMode = Literal['center_crop', 'keep_aspect']
RESIZE_MODES: tuple[str, ...] = ('center_crop', 'keep_aspect')


def load_image(source: bytes | str | os.PathLike[str], *,
               name: str | None = None) -> np.ndarray:
  """Decodes an image file (or its bytes) to a uint8 (H, W, 3) RGB array.

  RGBA, LA, L, P, CMYK, 16-bit and other modes are converted to RGB (alpha is
  dropped, not composited). The whole image is decoded here, so a truncated
  or corrupt file fails now rather than later.

  Args:
    source: the encoded bytes, or a path to the file.
    name: what to call the image in error messages (defaults to the path,
      or '<bytes>').

  Returns:
    The decoded image.

  Raises:
    ValueError: the data is not a readable image; the message names it.
    FileNotFoundError: `source` is a path that does not exist.
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    name = name or '<bytes>'
    stream = io.BytesIO(bytes(source))
  else:
    name = name or os.fspath(source)
    with open(source, 'rb') as f:
      stream = io.BytesIO(f.read())
  try:
    with Image.open(stream) as image:
      image.load()  # Decodes everything: truncation is detected here.
      rgb = _to_rgb(image)
  except (OSError, SyntaxError, ValueError, EOFError,
          Image.DecompressionBombError) as error:
    raise ValueError(f'{name}: not a readable image ({type(error).__name__}: '
                     f'{error}); the file is corrupt or truncated.') from error
  array = np.asarray(rgb, dtype=np.uint8)
  if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
    raise ValueError(f'{name}: decoded to shape {array.shape}, expected '
                     '(height, width, 3).')
  return array


def _to_rgb(image: Image.Image) -> Image.Image:
  if image.mode == 'RGB':
    return image
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    # 16/32-bit greyscale: scale to 8 bits before converting.
    array = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode.startswith('I;16') else max(array.max(), 1.0)
    image = Image.fromarray(
        np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8))
  elif image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')  # Avoids PIL's palette-transparency warning.
  return image.convert('RGB')


def _check_image(image: np.ndarray) -> None:
  if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or
      image.ndim != 3 or image.shape[2] != 3):
    raise ValueError('expected a uint8 (height, width, 3) array, got '
                     f'{getattr(image, "dtype", type(image))} '
                     f'{getattr(image, "shape", "")}')


def _check_size(size: int) -> None:
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f'size must be a positive integer, got {size!r}')


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize; PIL widens the kernel when shrinking (antialiasing)."""
  if image.shape[:2] == (height, width):
    return image
  resized = Image.fromarray(image).resize((width, height),
                                          Image.Resampling.BICUBIC)
  return np.asarray(resized, dtype=np.uint8)


def _scaled(length: int, scale: float) -> int:
  return max(1, int(round(length * scale)))


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (bicubic, antialiased) so the shorter side is `size` pixels."""
  _check_image(image)
  _check_size(size)
  height, width = image.shape[:2]
  scale = size / min(height, width)
  if height <= width:
    return _resize(image, size, _scaled(width, scale))
  return _resize(image, _scaled(height, scale), size)


def resize_longer_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (bicubic, antialiased) so the longer side is `size` pixels."""
  _check_image(image)
  _check_size(size)
  height, width = image.shape[:2]
  scale = size / max(height, width)
  if height >= width:
    return _resize(image, size, _scaled(width, scale))
  return _resize(image, _scaled(height, scale), size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central `size` x `size` window; both sides must be >= `size`."""
  _check_image(image)
  _check_size(size)
  height, width = image.shape[:2]
  if height < size or width < size:
    raise ValueError(f'cannot centre-crop a {height}x{width} image to '
                     f'{size}x{size}; resize it first.')
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


def pad_to_square(image: np.ndarray, size: int) -> np.ndarray:
  """Centres the image on a black `size` x `size` canvas (sides <= size)."""
  _check_image(image)
  _check_size(size)
  height, width = image.shape[:2]
  if height > size or width > size:
    raise ValueError(f'cannot pad a {height}x{width} image to {size}x{size}.')
  canvas = np.zeros((size, size, 3), np.uint8)
  top, left = (size - height) // 2, (size - width) // 2
  canvas[top:top + height, left:left + width] = image
  return canvas


def resize_and_crop(image: np.ndarray, size: int,
                    mode: ResizeMode = 'center_crop') -> np.ndarray:
  """A `size` x `size` version of `image`, so stored images always batch.

  Args:
    image: uint8 (H, W, 3).
    size: the output side.
    mode: 'center_crop' scales the shorter side to `size` and crops the
      centre (loses the borders of a non-square image); 'keep_aspect' scales
      the longer side to `size` and pads with black, centred (keeps it all).

  Returns:
    uint8 (size, size, 3).
  """
  if mode == 'center_crop':
    return center_crop(resize_shorter_side(image, size), size)
  if mode == 'keep_aspect':
    return pad_to_square(resize_longer_side(image, size), size)
  raise ValueError(f'resize mode must be one of {RESIZE_MODES}, got {mode!r}')


def clip_preprocess(image: np.ndarray, size: int = 224) -> np.ndarray:
  """CLIP's recipe: shorter side to `size` (bicubic), centre crop `size`.

  The mean/std normalisation is left to the model.
  """
  return center_crop(resize_shorter_side(image, size), size)


def encode_image(image: np.ndarray, image_format: str = 'png') -> bytes:
  """PNG (lossless, fast compression) or JPEG (quality 95) bytes of `image`."""
  _check_image(image)
  buffer = io.BytesIO()
  if image_format == 'png':
    Image.fromarray(image).save(buffer, format='PNG', compress_level=1)
  elif image_format == 'jpeg':
    Image.fromarray(image).save(buffer, format='JPEG', quality=95)
  else:
    raise ValueError(f"image_format must be 'png' or 'jpeg', got "
                     f'{image_format!r}')
  return buffer.getvalue()
