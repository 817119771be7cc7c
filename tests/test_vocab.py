"""Tests for reverse_sd.text.vocab."""

import json

import numpy as np
import pytest

from reverse_sd.text import vocab

TRAIN_PROMPTS = (
    'A portrait of a cat, very detailed, 8k',
    'portrait of a dog with a hat, trending on artstation',
    'a cat and a dog, oil painting',
    'Cat cat CAT',  # Counts once: document frequency.
)
# Document frequencies of TRAIN_PROMPTS: cat 3, dog 2, portrait 2, then 1 each
# for artstation, detailed, hat, oil, painting, trending.
EXPECTED_WORDS = ('cat', 'dog', 'portrait', 'artstation', 'detailed', 'hat',
                  'oil', 'painting', 'trending')


def test_tokenize_words_lowercases_and_splits_on_non_letters():
  assert vocab.tokenize_words("An 8K, sci-fi city; don't!") == [
      'an', 'k', 'sci', 'fi', 'city', 'don', 't']


def test_content_words_drop_stopwords_function_words_and_single_letters():
  words = vocab.content_words(
      'The cat with a very big hat would sit upon it, 8k, 3d')
  # "the", "with", "a", "very", "it" are NLTK stopwords; "would", "upon" are
  # EXTRA_FUNCTION_WORDS; "k" and "d" are single letters left by "8k", "3d".
  assert words == ['cat', 'big', 'hat', 'sit']


def test_content_words_keep_first_occurrence_order_without_repeats():
  assert vocab.content_words('red fox, Red FOX, blue fox') == [
      'red', 'fox', 'blue']


def test_build_counts_document_frequency_and_breaks_ties_alphabetically():
  vocabulary = vocab.Vocabulary.build(TRAIN_PROMPTS, size=100)
  assert vocabulary.words == EXPECTED_WORDS
  assert vocabulary.index['cat'] == 0
  assert vocabulary.index['trending'] == len(EXPECTED_WORDS) - 1
  assert not set(vocabulary.words) & vocab.NON_CONTENT_WORDS


def test_build_is_deterministic_whatever_the_prompt_order():
  first = vocab.Vocabulary.build(TRAIN_PROMPTS)
  again = vocab.Vocabulary.build(list(TRAIN_PROMPTS))
  reversed_order = vocab.Vocabulary.build(reversed(TRAIN_PROMPTS))
  assert first == again == reversed_order


def test_build_caps_size_at_the_most_frequent_words():
  vocabulary = vocab.Vocabulary.build(TRAIN_PROMPTS, size=4)
  # Ties at count 1 resolve alphabetically: "artstation" first.
  assert vocabulary.words == ('cat', 'dog', 'portrait', 'artstation')
  assert len(vocabulary) == 4


def test_build_uses_training_prompts_only():
  validation_prompts = ['a giraffe in the snow']
  vocabulary = vocab.Vocabulary.build(TRAIN_PROMPTS)
  assert 'giraffe' not in vocabulary.index
  labels = vocabulary.multi_hot(validation_prompts)
  assert labels.shape == (1, len(EXPECTED_WORDS))
  assert labels.sum() == 0, 'a validation-only word must not get a column'


@pytest.mark.parametrize('size', [0, -1, 2.5, True])
def test_build_rejects_bad_size(size):
  with pytest.raises(ValueError, match='size must be a positive int'):
    vocab.Vocabulary.build(TRAIN_PROMPTS, size=size)


def test_build_rejects_a_single_string():
  with pytest.raises(TypeError, match='single string'):
    vocab.Vocabulary.build('a cat')


def test_vocabulary_rejects_repeated_words():
  with pytest.raises(ValueError, match='repeat'):
    vocab.Vocabulary(('cat', 'dog', 'cat'))


def test_multi_hot_and_words_of():
  vocabulary = vocab.Vocabulary(('cat', 'dog', 'hat'))
  prompts = ['a dog in a hat', 'Cat, cat and a giraffe', 'nothing here']
  expected = np.array([[0, 1, 1],
                       [1, 0, 0],
                       [0, 0, 0]], np.uint8)
  labels = vocabulary.multi_hot(prompts)
  assert labels.dtype == np.uint8
  np.testing.assert_array_equal(labels, expected)
  assert vocabulary.words_of('a hat on a dog, a dog') == ['hat', 'dog']
  assert vocabulary.multi_hot([]).shape == (0, 3)


def test_save_load_round_trip(tmp_path):
  vocabulary = vocab.Vocabulary.build(TRAIN_PROMPTS)
  path = tmp_path / 'vocab.json'
  vocabulary.save(path)
  loaded = vocab.Vocabulary.load(path)
  assert loaded == vocabulary
  assert dict(loaded.index) == dict(vocabulary.index)
  assert json.loads(path.read_text())['version'] == vocab.FILE_VERSION
  assert [p.name for p in tmp_path.iterdir()] == ['vocab.json']


def test_load_missing_file_names_it(tmp_path):
  path = tmp_path / 'missing.json'
  with pytest.raises(FileNotFoundError, match='missing.json'):
    vocab.Vocabulary.load(path)


@pytest.mark.parametrize('content, message', [
    ('{"format": "reverse_sd.vocab', 'not a valid JSON'),
    ('["cat", "dog"]', 'not a vocabulary file'),
    ('{"format": "something.else", "version": 1, "words": []}',
     'not a vocabulary file'),
    ('{"format": "reverse_sd.vocabulary", "version": 99, "words": []}',
     'version 99'),
    ('{"format": "reverse_sd.vocabulary", "version": 1, "words": "cat"}',
     'must be a list'),
    ('{"format": "reverse_sd.vocabulary", "version": 1, "words": ["a", 3]}',
     'non-empty strings'),
])
def test_load_corrupt_file_names_it(tmp_path, content, message):
  path = tmp_path / 'corrupt.json'
  path.write_text(content)
  with pytest.raises(ValueError, match=message) as error:
    vocab.Vocabulary.load(path)
  assert 'corrupt.json' in str(error.value)
