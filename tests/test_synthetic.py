"""Tests for the synthetic corpus: grammar, renderer and TFDS builder."""

import collections
import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pytest

from reverse_sd.data import synthetic
from reverse_sd.data import synthetic_grammar as grammar
from reverse_sd.data import synthetic_render

SIZES = dict(num_train=120, num_validation=20, num_test=30,
             num_test_shifted=40)
IMAGE_SIZE = 32


def _build(data_dir, seed=0, **sizes):
  kwargs = dict(SIZES, **sizes)
  return synthetic.build(data_dir, seed=seed, image_size=IMAGE_SIZE,
                         progress=False, **kwargs)


def _read_split(builder, split):
  source = builder.as_data_source(split)
  return source.__getitems__(list(range(len(source))))


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The seed-0 corpus, built once for the module."""
  return _build(tmp_path_factory.mktemp('seed0'))


def test_vocabulary_sizes_meet_the_minima():
  assert len(grammar.SHAPES) >= 8
  assert len(grammar.COLOURS) >= 10
  assert len(grammar.SIZES) == 3
  assert len(grammar.POSITIONS) >= 5
  assert len(grammar.TEXTURES) == 5
  assert len(grammar.STYLES) >= 5
  assert len(grammar.MODIFIERS) >= 30
  for group, group_words in grammar.ATTRIBUTE_GROUPS.items():
    assert len(set(group_words)) == len(group_words), f'duplicates in {group}'


def test_attribute_names_index_the_vector():
  names = grammar.ATTRIBUTE_NAMES
  assert len(set(names)) == len(names)
  for group, group_words in grammar.ATTRIBUTE_GROUPS.items():
    for word in group_words:
      assert f'{group}={word}' in grammar.ATTRIBUTE_INDEX, (group, word)
  scene = grammar.sample_scene(np.random.default_rng(3))
  vector = grammar.attribute_vector(scene)
  assert vector.shape == (len(names),) and vector.dtype == np.uint8
  index = grammar.ATTRIBUTE_INDEX
  assert vector[index[f'count={len(scene.objects)}']] == 1
  assert vector[index[f'style={scene.style}']] == 1
  first = scene.objects[0]
  assert vector[index[f'object1/shape={first.shape}']] == 1
  # Per group, the bag counts add up to the number of objects.
  shape_total = sum(vector[index[f'shape={s}']] for s in grammar.SHAPES)
  assert shape_total == len(scene.objects)


def test_modifiers_share_no_word_with_the_rendered_vocabulary():
  rendered = {w for group in grammar.ATTRIBUTE_GROUPS.values()
              for phrase in group for w in grammar.words(phrase)}
  for modifier in grammar.MODIFIERS:
    shared = set(grammar.words(modifier)) & rendered - {'art'}
    assert not shared, f'modifier {modifier!r} uses rendered words {shared}'


def test_generate_example_is_a_pure_function():
  first = synthetic.generate_example(0, 'train', 7, IMAGE_SIZE)
  again = synthetic.generate_example(0, 'train', 7, IMAGE_SIZE)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key], err_msg=key)
  other_seed = synthetic.generate_example(1, 'train', 7, IMAGE_SIZE)
  other_split = synthetic.generate_example(0, 'test', 7, IMAGE_SIZE)
  assert other_seed['prompt'] != first['prompt']
  assert other_split['prompt'] != first['prompt']
  assert not np.array_equal(other_seed['image'], first['image'])


def test_prompts_read_like_sd_prompts():
  for index in range(200):
    example = synthetic.generate_example(0, 'train', index, IMAGE_SIZE)
    prompt, rendered = example['prompt'], example['rendered_prompt']
    assert 0 < example['alignment'] <= 1
    prompt_words = collections.Counter(grammar.words(prompt))
    rendered_words = collections.Counter(grammar.words(rendered))
    assert not rendered_words - prompt_words, (prompt, rendered)
    assert example['alignment'] == pytest.approx(
        sum(rendered_words.values()) / sum(prompt_words.values()))
    assert 'background' in rendered and prompt.startswith(
        ('a ', *grammar.STYLES, *grammar.MODIFIERS))


def test_alignment_varies_across_examples():
  alignments = [synthetic.generate_example(0, 'train', i, 16)['alignment']
                for i in range(200)]
  assert min(alignments) < 0.6 and max(alignments) == 1.0


@pytest.mark.parametrize('size', [32, 64, 224])
def test_render_sizes(size):
  scene = grammar.sample_scene(np.random.default_rng(0))
  image = synthetic_render.render(scene, size)
  assert image.shape == (size, size, 3) and image.dtype == np.uint8


def _one_object_scene(style='flat design', domain='standard', size='small'):
  return grammar.Scene(
      objects=(grammar.SceneObject('circle', 'red', size, 'center'),),
      background_colour='blue', texture='plain', style=style, modifiers=(),
      domain=domain, prompt='', rendered_prompt='', render_seed=0)


def test_an_object_is_visible_in_its_colour():
  image = synthetic_render.render(_one_object_scene(), 64).astype(int)
  red = np.array(synthetic_render.PALETTES['standard']['red'])
  object_pixels = np.sum(np.abs(image - red).sum(-1) < 30)
  expected = np.pi * (0.10 * 64) ** 2  # Area of a small circle.
  assert 0.7 * expected < object_pixels < 1.3 * expected
  # In the middle, not at the border.
  assert np.abs(image[32, 32] - red).sum() < 30


def test_every_style_changes_the_image_but_keeps_the_object():
  flat = synthetic_render.render(_one_object_scene(size='large'), 64)
  for style in grammar.STYLES[1:]:
    styled = synthetic_render.render(_one_object_scene(style, size='large'),
                                     64)
    assert not np.array_equal(styled, flat), style
    # Red still dominates the centre of the object (or its outline).
    window = styled[16:48, 16:48].reshape(-1, 3).astype(int)
    reddish = (window[:, 0] > window[:, 2] + 40).sum()
    assert reddish > 40, f'{style}: only {reddish} red pixels'


@pytest.mark.parametrize('index', range(6))
def test_object_mask_is_where_render_draws_the_object(index):
  """The mask replays `render`'s random draws: on flat-design scenes the
  pixels it covers fully have the object's colour, those it leaves free the
  background's (whatever the shape, size, jitter and texture)."""
  scene = dataclasses.replace(synthetic.example_scene(3, 'train', index, 1),
                              style='flat design')
  image = synthetic_render.render(scene, 64).astype(int)
  mask = synthetic_render.object_mask(scene, 64)
  assert mask.shape == (64, 64) and mask.dtype == np.float32
  assert 0.0 <= mask.min() and mask.max() == 1.0
  colour = np.array(synthetic_render.PALETTES['standard'][
      scene.objects[0].colour])
  is_object = np.abs(image - colour).sum(-1) <= 6
  np.testing.assert_array_equal(is_object[mask == 1.0], True)
  # The background may share the object's colour (a texture's second
  # shade rarely does); away from the object, few pixels match.
  assert is_object[mask == 0.0].mean() < 0.5 or scene.background_colour == (
      scene.objects[0].colour)
  assert np.mean(mask) == pytest.approx(np.mean(is_object), abs=0.02) or (
      scene.background_colour == scene.objects[0].colour)


def test_object_mask_ignores_the_style():
  masks = [synthetic_render.object_mask(_one_object_scene(style), 64)
           for style in grammar.STYLES if style != 'outline sketch']
  for mask in masks[1:]:
    np.testing.assert_array_equal(mask, masks[0])
  outline = synthetic_render.object_mask(
      _one_object_scene('outline sketch'), 64)
  assert 0 < outline.sum() < masks[0].sum()  # Only the outline is drawn.


def test_shifted_domain_changes_the_palette_and_style_mix():
  standard, shifted = (synthetic_render.PALETTES[d]
                       for d in ('standard', 'shifted'))
  for colour in grammar.COLOURS:
    assert standard[colour] != shifted[colour], colour
  image = synthetic_render.render(_one_object_scene(), 64)
  shifted_image = synthetic_render.render(
      _one_object_scene(domain='shifted'), 64)
  assert not np.array_equal(image, shifted_image)
  assert (grammar.STYLE_PROBABILITIES['standard'] !=
          grammar.STYLE_PROBABILITIES['shifted'])


def test_splits_sizes_ids_and_features(built):
  assert set(built.info.splits.keys()) == set(synthetic.SPLITS)
  for split in synthetic.SPLITS:
    rows = _read_split(built, split)
    assert len(rows) == SIZES[f'num_{split}'], split
    ids = [_text(row['id']) for row in rows]
    assert ids == [f'{split}/{i:08d}' for i in range(len(rows))]
    for row in rows:
      assert row['image'].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
      assert row['image'].dtype == np.uint8
      assert 0 < row['alignment'] <= 1
      assert row['attributes'].shape == (len(grammar.ATTRIBUTE_NAMES),)
      prompt_words = collections.Counter(grammar.words(_text(row['prompt'])))
      rendered = collections.Counter(
          grammar.words(_text(row['rendered_prompt'])))
      assert not rendered - prompt_words
      expected_domain = 'shifted' if split == 'test_shifted' else 'standard'
      assert _text(row['domain']) == expected_domain


def test_records_equal_generate_example(built):
  rows = _read_split(built, 'test_shifted')
  for index in (0, 17, len(rows) - 1):
    expected = synthetic.generate_example(0, 'test_shifted', index,
                                          IMAGE_SIZE)
    row = rows[index]
    np.testing.assert_array_equal(row['image'], expected['image'])
    np.testing.assert_array_equal(row['attributes'], expected['attributes'])
    assert _text(row['prompt']) == expected['prompt']
    assert row['alignment'] == pytest.approx(expected['alignment'])


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
  again = _build(tmp_path / 'again')
  for split in synthetic.SPLITS:
    for first, second in zip(_read_split(built, split),
                             _read_split(again, split), strict=True):
      for key in first:
        np.testing.assert_array_equal(first[key], second[key],
                                      err_msg=f'{split} {key}')
  other = _build(tmp_path / 'seed1', seed=1)
  first_prompts = [_text(r['prompt']) for r in _read_split(built, 'train')]
  other_prompts = [_text(r['prompt']) for r in _read_split(other, 'train')]
  assert sum(a != b for a, b in zip(first_prompts, other_prompts)) > 100


def test_train_and_test_prompts_barely_overlap(built):
  train = {_text(r['prompt']) for r in _read_split(built, 'train')}
  test = [_text(r['prompt']) for r in _read_split(built, 'test')]
  assert sum(p in train for p in test) <= 1


def _file_stamps(folder):
  return {path: os.stat(path).st_mtime_ns
          for path in glob.glob(os.path.join(folder, '**'), recursive=True)
          if os.path.isfile(path)}


def test_second_call_reuses_the_build(built, monkeypatch):
  stamps = _file_stamps(built.data_path)
  assert stamps, built.data_path

  def must_not_regenerate(*args, **kwargs):
    raise AssertionError(f'build() regenerated {built.data_path}: '
                         f'{args} {kwargs}')

  monkeypatch.setattr(synthetic, 'prepare', must_not_regenerate)
  monkeypatch.setattr(synthetic, 'generate_example', must_not_regenerate)
  again = _build(built.data_dir_root)
  assert os.fspath(again.data_path) == os.fspath(built.data_path)
  assert _file_stamps(built.data_path) == stamps, (
      'a second build() with the same arguments rewrote files')


def test_config_name_encodes_the_settings():
  config = synthetic.make_config(seed=3, image_size=32, num_train=10,
                                 num_validation=1, num_test=2,
                                 num_test_shifted=4)
  assert config.name == 'seed3_32px_10-1-2-4'
  assert synthetic.make_config().name == 'seed0_64px_20000-1000-2000-2000'
  with pytest.raises(ValueError, match='num_train'):
    synthetic.make_config(num_train=0)
  with pytest.raises(ValueError, match='image_size'):
    synthetic.make_config(image_size=8)


def _copy_build(built, destination):
  shutil.copytree(built.data_dir_root, destination)
  relative = os.path.relpath(built.data_path, built.data_dir_root)
  return os.path.join(destination, relative)


def _truncate_train_shard(variant_dir):
  path = glob.glob(os.path.join(variant_dir, '*-train.array_record-*'))[0]
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  return path


def _remove_test_shard(variant_dir):
  path = glob.glob(os.path.join(variant_dir, '*-test.array_record-*'))[0]
  os.remove(path)
  return path


def _damage_info(variant_dir):
  path = os.path.join(variant_dir, 'dataset_info.json')
  with open(path, 'w') as f:
    f.write('{"name": "synthetic_pro')
  return path


@pytest.mark.parametrize('damage', [_truncate_train_shard, _remove_test_shard,
                                    _damage_info])
def test_broken_build_gives_a_clear_error(built, tmp_path, damage):
  variant_dir = _copy_build(built, tmp_path / 'copy')
  damaged_path = damage(variant_dir)
  files_before = sorted(os.listdir(variant_dir))
  with pytest.raises(synthetic.BrokenBuildError) as error:
    _build(tmp_path / 'copy')
  message = str(error.value)
  assert damaged_path in message and 'Delete' in message
  assert sorted(os.listdir(variant_dir)) == files_before  # Nothing deleted.


def test_dataset_info_lists_the_attribute_names(built):
  with open(os.path.join(built.data_path, 'metadata.json')) as f:
    metadata = json.load(f)
  assert tuple(metadata['attribute_names']) == grammar.ATTRIBUTE_NAMES


def test_scene_is_frozen():
  scene = grammar.sample_scene(np.random.default_rng(0))
  with pytest.raises(dataclasses.FrozenInstanceError):
    scene.style = 'flat design'  # type: ignore[misc]
