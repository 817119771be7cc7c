"""Tests for image decoding, resizing, cropping and padding."""

import io

import numpy as np
from PIL import Image
import pytest

import fake_assets
from reverse_sd.data import preprocess


def _image(height=40, width=48, seed=0):
  return fake_assets.random_image(np.random.default_rng(seed), width, height)


def _encode(array, mode=None, image_format='PNG', **kwargs):
  buffer = io.BytesIO()
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  image.save(buffer, format=image_format, **kwargs)
  return buffer.getvalue()


def test_load_image_round_trips_png_bytes_and_paths(tmp_path):
  image = _image()
  data = _encode(image)
  np.testing.assert_array_equal(preprocess.load_image(data), image)
  path = tmp_path / 'a.png'
  path.write_bytes(data)
  loaded = preprocess.load_image(path)
  assert loaded.dtype == np.uint8 and loaded.shape == (40, 48, 3)
  np.testing.assert_array_equal(loaded, image)


@pytest.mark.parametrize('mode', ['RGBA', 'L', 'P', 'LA', 'I;16', 'CMYK'])
def test_load_image_converts_other_modes_to_rgb(mode):
  image_format = 'JPEG' if mode == 'CMYK' else 'PNG'
  if mode == 'I;16':
    grey = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30)
    data = _encode(grey)
  else:
    data = _encode(_image(), mode=mode, image_format=image_format)
  loaded = preprocess.load_image(data)
  assert loaded.dtype == np.uint8 and loaded.shape == (40, 48, 3), mode
  if mode == 'I;16':
    assert loaded.max() > 200  # Scaled from 16 bits, not clipped to 255.


def test_lossless_webp_decodes_exactly():
  image = _image()
  data = _encode(image, image_format='WEBP', lossless=True)
  np.testing.assert_array_equal(preprocess.load_image(data), image)


def test_truncated_image_is_a_clear_error_naming_the_file(tmp_path):
  path = tmp_path / 'cut.png'
  path.write_bytes(fake_assets.truncated_png(np.random.default_rng(0)))
  with pytest.raises(ValueError, match=r'cut\.png.*truncated'):
    preprocess.load_image(path)
  with pytest.raises(ValueError, match='part-1.zip:x.png'):
    preprocess.load_image(path.read_bytes(), name='part-1.zip:x.png')
  with pytest.raises(ValueError, match='<bytes>'):
    preprocess.load_image(b'not an image at all')


def test_missing_file_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError):
    preprocess.load_image(tmp_path / 'nope.png')


def test_resize_shorter_and_longer_side_shapes():
  image = _image(40, 48)
  assert preprocess.resize_shorter_side(image, 32).shape == (32, 38, 3)
  assert preprocess.resize_longer_side(image, 32).shape == (27, 32, 3)
  tall = _image(48, 40)
  assert preprocess.resize_shorter_side(tall, 32).shape == (38, 32, 3)
  assert preprocess.resize_longer_side(tall, 32).shape == (32, 27, 3)
  assert preprocess.resize_shorter_side(image, 40) is image  # No-op.


def test_downscaling_is_antialiased():
  # A one-pixel checkerboard shrunk 8x must average to grey, not alias.
  checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
  image = np.repeat(checker[..., None], 3, axis=2)
  small = preprocess.resize_shorter_side(image, 8)
  assert np.abs(small.astype(int) - 128).max() < 20, small[..., 0]


def test_center_crop_takes_the_middle():
  image = _image(40, 48)
  crop = preprocess.center_crop(image, 32)
  np.testing.assert_array_equal(crop, image[4:36, 8:40])
  with pytest.raises(ValueError, match='40x48.*resize it first'):
    preprocess.center_crop(image, 44)


@pytest.mark.parametrize('mode', preprocess.RESIZE_MODES)
@pytest.mark.parametrize('height,width', [(40, 48), (48, 40), (50, 50),
                                          (10, 12)])
def test_resize_and_crop_gives_a_fixed_square(mode, height, width):
  out = preprocess.resize_and_crop(_image(height, width), 32, mode)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_keep_aspect_pads_with_black_centred():
  grey = np.full((40, 48, 3), 120, np.uint8)
  out = preprocess.resize_and_crop(grey, 32, 'keep_aspect')
  # 40x48 -> 27x32, centred: rows 2..28 are the image, the rest black.
  assert not out[:2].any() and not out[29:].any()
  assert out[2:29].all()


def test_unknown_resize_mode_is_rejected():
  with pytest.raises(ValueError, match="'stretch'"):
    preprocess.resize_and_crop(_image(), 32, 'stretch')


def test_clip_preprocess_is_shorter_side_then_centre_crop():
  image = _image(300, 400)
  out = preprocess.clip_preprocess(image, 224)
  assert out.shape == (224, 224, 3)
  expected = preprocess.center_crop(
      preprocess.resize_shorter_side(image, 224), 224)
  np.testing.assert_array_equal(out, expected)


def test_bad_arrays_are_rejected():
  with pytest.raises(ValueError, match='uint8'):
    preprocess.resize_shorter_side(np.zeros((4, 4, 3), np.float32), 2)
  with pytest.raises(ValueError, match='size'):
    preprocess.center_crop(_image(), 0)


def test_encode_image_png_is_lossless_jpeg_is_close():
  image = _image()
  png = preprocess.encode_image(image, 'png')
  np.testing.assert_array_equal(preprocess.load_image(png), image)
  ramp = np.linspace(0, 255, 48).astype(np.uint8)
  smooth = np.tile(ramp[None, :, None], (40, 1, 3))
  jpeg = preprocess.load_image(preprocess.encode_image(smooth, 'jpeg'))
  assert np.abs(jpeg.astype(int) - smooth).mean() < 3
  with pytest.raises(ValueError, match='gif'):
    preprocess.encode_image(image, 'gif')
