"""Tests of the referee: labels, metrics, a short training and its resume."""

import json

import numpy as np
import pytest

from reverse_sd import checkpointing
from reverse_sd.data import synthetic
from reverse_sd.data import synthetic_grammar as grammar
from reverse_sd.loop import referee

# A tiny network, so that training in the tests takes seconds.
TINY = {'base_width': 8, 'feature_dim': 32}
# Its loss plateaus for about 60 steps before it starts to learn.
TRAINING = dict(steps=200, batch_size=32, lr=3e-3, log_every=0, **TINY)


def _scene(objects, background='blue', texture='striped', style='pixel art'):
  return grammar.Scene(
      objects=tuple(grammar.SceneObject(*o) for o in objects),
      background_colour=background, texture=texture, style=style,
      modifiers=(), domain='standard', prompt='p', rendered_prompt='p',
      render_seed=0)


def _examples(split, n, image_size=32, max_objects=1):
  examples = [synthetic.generate_example(0, split, i, image_size,
                                         max_objects=max_objects)
              for i in range(n)]
  return (np.stack([e['image'] for e in examples]),
          np.stack([e['attributes'] for e in examples]))


def _labels(n=3, **values):
  """A label dict of n examples: 0 everywhere, -1 in slots 2 and 3."""
  labels = {k: np.zeros(n, np.int32) for k in referee.LABEL_KEYS}
  for key in referee.LABEL_KEYS:
    if key.startswith(('object2', 'object3')):
      labels[key][:] = -1
  for key, value in values.items():
    labels[key.replace('__', '/')] = np.asarray(value, np.int32)
  return labels


# --- Labels ------------------------------------------------------------------


def test_label_keys_and_class_counts():
  assert referee.LABEL_KEYS[0] == 'count'
  assert len(referee.LABEL_KEYS) == 1 + 3 * 4 + 3
  assert referee.LABEL_KEYS[1:5] == ('object1/shape', 'object1/colour',
                                     'object1/size', 'object1/position')
  assert referee.num_classes('count') == 3
  assert referee.num_classes('object2/shape') == len(grammar.SHAPES)
  assert referee.num_classes('background_colour') == len(grammar.COLOURS)
  assert referee.num_classes('style') == len(grammar.STYLES)
  assert set(referee.GROUPS) == {referee.group_of(k)
                                 for k in referee.LABEL_KEYS}


def test_labels_of_hand_made_scenes():
  one = _scene([('star', 'red', 'large', 'top left')], background='grey',
               texture='dotted', style='watercolor')
  two = _scene([('ring', 'teal', 'small', 'top'),
                ('heart', 'white', 'medium', 'bottom right')])
  attributes = np.stack([grammar.attribute_vector(s) for s in (one, two)])
  labels = referee.labels_from_attributes(attributes)
  assert set(labels) == set(referee.LABEL_KEYS)
  assert all(v.dtype == np.int32 and v.shape == (2,) for v in labels.values())
  np.testing.assert_array_equal(labels['count'], [0, 1])
  np.testing.assert_array_equal(
      labels['object1/shape'],
      [grammar.SHAPES.index('star'), grammar.SHAPES.index('ring')])
  np.testing.assert_array_equal(
      labels['object1/colour'],
      [grammar.COLOURS.index('red'), grammar.COLOURS.index('teal')])
  np.testing.assert_array_equal(labels['object1/size'], [2, 0])
  np.testing.assert_array_equal(
      labels['object2/position'],
      [-1, grammar.POSITIONS.index('bottom right')])
  np.testing.assert_array_equal(
      labels['object2/shape'], [-1, grammar.SHAPES.index('heart')])
  for group in referee.OBJECT_GROUPS:
    np.testing.assert_array_equal(labels[f'object3/{group}'], [-1, -1])
  np.testing.assert_array_equal(
      labels['background_colour'],
      [grammar.COLOURS.index('grey'), grammar.COLOURS.index('blue')])
  np.testing.assert_array_equal(
      labels['texture'],
      [grammar.TEXTURES.index('dotted'), grammar.TEXTURES.index('striped')])
  np.testing.assert_array_equal(
      labels['style'],
      [grammar.STYLES.index('watercolor'), grammar.STYLES.index('pixel art')])


def test_labels_reject_bad_vectors():
  vector = grammar.attribute_vector(
      _scene([('star', 'red', 'large', 'top left')]))
  with pytest.raises(ValueError, match='len\\(ATTRIBUTE_NAMES\\)'):
    referee.labels_from_attributes(vector[None, :-1])
  two_styles = vector.copy()
  two_styles[grammar.ATTRIBUTE_INDEX['style=blurred']] = 1
  with pytest.raises(ValueError, match="'style'.*exactly one"):
    referee.labels_from_attributes(two_styles[None])
  no_shape = vector.copy()
  no_shape[grammar.ATTRIBUTE_INDEX['object1/shape=star']] = 0
  with pytest.raises(ValueError, match="'object1/shape'"):
    referee.labels_from_attributes(no_shape[None])


# --- Metrics -----------------------------------------------------------------


def test_accuracy_pools_present_slots_and_chance():
  labels = _labels(3, object1__shape=[1, 2, 2], object2__shape=[3, -1, -1],
                   background_colour=[4, 4, 5])
  predicted = _labels(3, object1__shape=[1, 2, 0], object2__shape=[3, 7, 7],
                      background_colour=[4, 0, 5])
  accuracy = referee.accuracy(predicted, labels)
  assert set(accuracy) == set(referee.GROUPS)
  # Shape: 4 present values (3 in slot 1, 1 in slot 2), 3 right; the
  # prediction in absent slots does not count.
  assert accuracy['shape'] == pytest.approx(3 / 4)
  assert accuracy['background_colour'] == pytest.approx(2 / 3)
  assert accuracy['count'] == 1.0
  chance = referee.chance(labels)
  assert chance['shape'] == pytest.approx(2 / 4)  # Value 2, twice of 4.
  assert chance['background_colour'] == pytest.approx(2 / 3)
  assert chance['texture'] == 1.0
  uniform = referee.uniform_chance()
  assert uniform['shape'] == pytest.approx(1 / len(grammar.SHAPES))
  assert uniform['count'] == pytest.approx(1 / 3)
  assert uniform['position'] == pytest.approx(1 / len(grammar.POSITIONS))


def test_alignment_is_the_share_of_present_targets_matched():
  labels = _labels(2, object2__shape=[3, -1], object2__colour=[1, -1],
                   object2__size=[0, -1], object2__position=[2, -1],
                   count=[1, 0])
  predicted = _labels(2, object2__shape=[3, 5], object2__colour=[0, 5],
                      object2__size=[0, 5], object2__position=[2, 5],
                      count=[1, 0], style=[0, 1])
  scores = referee.alignment(predicted, labels)
  assert scores.dtype == np.float32
  # Example 0: 12 present targets (count, 2 slots x 4, 3 scene-wide), the
  # colour of slot 2 wrong. Example 1: 8 present, the style wrong.
  np.testing.assert_allclose(scores, [11 / 12, 7 / 8], rtol=1e-6)
  assert referee.alignment(labels, labels).tolist() == [1.0, 1.0]


def test_metrics_reject_mismatched_dicts():
  labels = _labels(3)
  with pytest.raises(ValueError, match='lacks the label keys'):
    referee.accuracy({'count': labels['count']}, labels)
  with pytest.raises(ValueError, match='predicted has 2 examples, labels 3'):
    referee.alignment(_labels(2), labels)


def test_mean_pairwise_distance():
  features = np.zeros((2, 3, 2), np.float32)
  # Prompt 0: a 3-4-5 triangle (distances 3, 4, 5); prompt 1: one point.
  features[0] = [[0, 0], [3, 0], [0, 4]]
  features[1] = [[1, 1], [1, 1], [1, 1]]
  assert referee.mean_pairwise_distance(features) == pytest.approx(
      (12 / 3 + 0) / 2)
  with pytest.raises(ValueError, match='S >= 2'):
    referee.mean_pairwise_distance(features[:, :1])


# --- Model and training ------------------------------------------------------


@pytest.mark.parametrize('image_size', [32, 64])
def test_network_output_shapes(image_size):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = referee.RefereeNet(**TINY)
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.uint8)

  def init_and_apply(images):
    variables = model.init(jax.random.PRNGKey(0), images)
    return model.apply(variables, images)
  features, logits = jax.eval_shape(init_and_apply, images)
  assert features.shape == (2, TINY['feature_dim'])
  assert set(logits) == set(referee.LABEL_KEYS)
  assert logits['object3/position'].shape == (2, len(grammar.POSITIONS))


def test_train_rejects_bad_images(tmp_path):
  _, attributes = _examples('train', 2)
  with pytest.raises(ValueError, match='uint8 \\[N, H, W, 3\\]'):
    referee.train(np.zeros((2, 32, 32, 3), np.float32), attributes,
                  workdir=tmp_path, steps=1)
  with pytest.raises(ValueError, match='uint8 \\[N, H, W, 3\\]'):
    referee.train(np.zeros((2, 32, 32), np.uint8), attributes,
                  workdir=tmp_path, steps=1)
  with pytest.raises(ValueError, match='empty'):
    referee.train(np.zeros((0, 32, 32, 3), np.uint8), attributes[:0],
                  workdir=tmp_path, steps=1)
  with pytest.raises(ValueError, match='3 images but 2 attribute vectors'):
    referee.train(np.zeros((3, 32, 32, 3), np.uint8), attributes,
                  workdir=tmp_path, steps=1)


def test_batch_order_is_a_function_of_seed_and_step():
  epoch = np.concatenate([referee.batch_indices(0, s, 4, 10)
                          for s in range(5)])
  # Two epochs of 10: each a permutation of all examples.
  assert sorted(epoch[:10]) == list(range(10))
  assert sorted(epoch[10:]) == list(range(10))
  np.testing.assert_array_equal(referee.batch_indices(0, 3, 4, 10),
                                epoch[12:16])
  assert not np.array_equal(referee.batch_indices(1, 0, 4, 10), epoch[:4])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('referee')
  images, attributes = _examples('train', 512)
  model = referee.train(images, attributes, workdir=workdir, **TRAINING)
  return workdir, model, (images, attributes)


def test_short_training_beats_chance_on_held_out_images(trained):
  _, model, _ = trained
  images, attributes = _examples('test', 128)
  labels = referee.labels_from_attributes(attributes)
  accuracy = referee.accuracy(model.predict(images), labels)
  chance = referee.chance(labels)
  assert accuracy['background_colour'] > chance['background_colour'] + 0.1, (
      f'accuracy {accuracy} against majority-class chance {chance}')
  assert accuracy['count'] == 1.0  # One-object scenes only.


def test_finished_checkpoint_is_loaded_not_retrained(trained, monkeypatch):
  workdir, model, (images, attributes) = trained
  results = json.loads((workdir / referee.RESULTS_FILE).read_text())
  assert results['steps'] == 200 and results['image_size'] == 32
  assert results['time_s'] > 0

  def fail(*args, **kwargs):
    raise AssertionError('A finished referee was trained again.')
  monkeypatch.setattr(referee, '_train_loop', fail)
  again = referee.train(images, attributes, workdir=workdir, **TRAINING)
  loaded = referee.Referee.load(workdir)
  expected = model.predict(images[:50])
  for other in (again, loaded):
    predicted = other.predict(images[:50])
    for key in referee.LABEL_KEYS:
      np.testing.assert_array_equal(predicted[key], expected[key], key)
  np.testing.assert_array_equal(loaded.features(images[:5]),
                                model.features(images[:5]))


def test_other_settings_in_the_same_workdir_are_refused(trained):
  workdir, _, (images, attributes) = trained
  with pytest.raises(ValueError,
                     match="other settings.*'steps': \\(200, 201\\)"):
    referee.train(images, attributes, workdir=workdir,
                  **dict(TRAINING, steps=TRAINING['steps'] + 1))


def test_predict_any_batch_size_and_masks_absent_slots(trained):
  _, model, (images, _) = trained
  n = referee.PREDICT_BATCH_SIZE + 3  # Not a multiple of the batch.
  predicted = model.predict(images[:n])
  assert all(v.shape == (n,) and v.dtype == np.int32
             for v in predicted.values())
  single = model.predict(images[n - 1:n])
  for key in referee.LABEL_KEYS:
    assert single[key][0] == predicted[key][-1], key
  counts = predicted['count'] + 1
  for slot in (2, 3):
    np.testing.assert_array_equal(predicted[f'object{slot}/shape'] == -1,
                                  counts < slot)
  features = model.features(images[:7])
  assert features.shape == (7, TINY['feature_dim'])
  assert features.dtype == np.float32
  with pytest.raises(ValueError, match='reads 32x32 images, got 16x16'):
    model.predict(images[:2, :16, :16])
  with pytest.raises(ValueError, match='uint8'):
    model.predict(images[:2].astype(np.float32))


def test_load_without_checkpoint_names_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    referee.Referee.load(tmp_path)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'missing')):
    referee.Referee.load(tmp_path / 'missing')


def test_checkpoint_of_another_model_is_refused(trained):
  import jax  # pylint: disable=g-import-not-at-top
  workdir, _, _ = trained
  setup = json.loads((workdir / referee.RESULTS_FILE).read_text())['setup']
  init_state = referee._init_state  # pylint: disable=protected-access
  other = jax.eval_shape(lambda: init_state(dict(setup, feature_dim=16), 0))
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    with pytest.raises(ValueError, match='(?s)does not fit.*features/kernel'):
      checkpointing.check_compatible(manager, manager.latest_step(), other)
  finally:
    manager.close()


def test_killed_training_resumes_the_same_stream(tmp_path, monkeypatch):
  images, attributes = _examples('train', 40)
  # The fixture's network and batch size: its compiled step serves.
  settings = dict(TRAINING, steps=4)
  whole = referee.train(images, attributes, workdir=tmp_path / 'whole',
                        **settings)
  save = checkpointing.save

  def save_then_die(manager, step, *args, **kwargs):
    saved = save(manager, step, *args, **kwargs)
    if step == 2:
      manager.wait_until_finished()
      raise KeyboardInterrupt('killed after the save of step 2')
    return saved
  monkeypatch.setattr(checkpointing, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    referee.train(images, attributes, workdir=tmp_path / 'killed', **settings)
  monkeypatch.setattr(checkpointing, 'save', save)
  resumed = referee.train(images, attributes, workdir=tmp_path / 'killed',
                          **settings)
  results = json.loads((tmp_path / 'killed' / referee.RESULTS_FILE
                        ).read_text())
  assert results['resumed_from_step'] == 2
  np.testing.assert_allclose(resumed.features(images),
                             whole.features(images), rtol=1e-5, atol=1e-6)
