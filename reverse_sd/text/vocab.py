"""The prompt vocabulary of the vocabulary head: content words and multi-hot.

The paper's auxiliary head predicts which of the most common content words of
the training prompts appear in an image's prompt. This module turns prompts
into those words and targets, in plain Python and numpy:

  vocabulary = Vocabulary.build(train_prompts, size=1000)
  vocabulary.save(workdir / 'vocab.json')
  labels_NxV = vocabulary.multi_hot(eval_prompts)   # uint8

Content words. There is no offline part-of-speech tagger in the environment
(NLTK's tagger needs a data download at run time), so content words are
approximated: alphabetic tokens (`tokenize_words`) minus the NLTK English
stopwords (`ENGLISH_STOPWORDS`), minus a short list of further function words
(`EXTRA_FUNCTION_WORDS`), minus single letters. Adjectives and verbs are kept
("detailed", "trending"): in Stable Diffusion prompts they are style words
the head should predict anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import collections
import dataclasses
import json
import os
import pathlib
import re
import types

import numpy as np

# The NLTK English stopword list (nltk_data `corpora/stopwords/english`, the
# 179-word version shipped 2018-2023), written out so that nothing is
# downloaded. Entries with an apostrophe never equal a token of
# `tokenize_words`, but their pieces ("don", "t") are in the list too.
ENGLISH_STOPWORDS = frozenset((
    'i', 'me', 'my', 'myself', 'we', 'our', 'ours', 'ourselves', 'you',
    "you're", "you've", "you'll", "you'd", 'your', 'yours', 'yourself',
    'yourselves', 'he', 'him', 'his', 'himself', 'she', "she's", 'her', 'hers',
    'herself', 'it', "it's", 'its', 'itself', 'they', 'them', 'their',
    'theirs', 'themselves', 'what', 'which', 'who', 'whom', 'this', 'that',
    "that'll", 'these', 'those', 'am', 'is', 'are', 'was', 'were', 'be',
    'been', 'being', 'have', 'has', 'had', 'having', 'do', 'does', 'did',
    'doing', 'a', 'an', 'the', 'and', 'but', 'if', 'or', 'because', 'as',
    'until', 'while', 'of', 'at', 'by', 'for', 'with', 'about', 'against',
    'between', 'into', 'through', 'during', 'before', 'after', 'above',
    'below', 'to', 'from', 'up', 'down', 'in', 'out', 'on', 'off', 'over',
    'under', 'again', 'further', 'then', 'once', 'here', 'there', 'when',
    'where', 'why', 'how', 'all', 'any', 'both', 'each', 'few', 'more', 'most',
    'other', 'some', 'such', 'no', 'nor', 'not', 'only', 'own', 'same', 'so',
    'than', 'too', 'very', 's', 't', 'can', 'will', 'just', 'don', "don't",
    'should', "should've", 'now', 'd', 'll', 'm', 'o', 're', 've', 'y', 'ain',
    'aren', "aren't", 'couldn', "couldn't", 'didn', "didn't", 'doesn',
    "doesn't", 'hadn', "hadn't", 'hasn', "hasn't", 'haven', "haven't", 'isn',
    "isn't", 'ma', 'mightn', "mightn't", 'mustn', "mustn't", 'needn',
    "needn't", 'shan', "shan't", 'shouldn', "shouldn't", 'wasn', "wasn't",
    'weren', "weren't", 'won', "won't", 'wouldn', "wouldn't",
))

# Function words that NLTK's list lacks and a tagger would drop (modals,
# prepositions, quantifiers, discourse adverbs). Kept short on purpose:
# anything that can be a style word in a prompt ("like", "highly", "ultra")
# stays a content word.
EXTRA_FUNCTION_WORDS = frozenset((
    'also', 'although', 'among', 'another', 'around', 'behind', 'beside',
    'besides', 'could', 'either', 'etc', 'even', 'ever', 'every', 'however',
    'may', 'might', 'must', 'neither', 'onto', 'per', 'quite', 'rather',
    'shall', 'though', 'thus', 'toward', 'towards', 'upon', 'via', 'whose',
    'within', 'without', 'would', 'yet',
))

NON_CONTENT_WORDS = ENGLISH_STOPWORDS | EXTRA_FUNCTION_WORDS

FILE_FORMAT = 'reverse_sd.vocabulary'
FILE_VERSION = 1

_WORD_RE = re.compile(r'[a-z]+')


def tokenize_words(text: str) -> list[str]:
  """Lower-cased alphabetic tokens of `text`, in order, repeats kept.

  Tokens are the matches of `[a-z]+` after lower-casing, so digits and
  punctuation only separate words: "8k" gives "k", "3d render" gives "d",
  "render", "don't" gives "don", "t", "sci-fi" gives "sci", "fi". Non-ASCII
  letters also separate words ("café" gives "caf").
  """
  if not isinstance(text, str):
    raise TypeError(f'expected a prompt string, got {type(text).__name__}')
  return _WORD_RE.findall(text.lower())


def is_content_word(word: str) -> bool:
  """Whether a token counts as a content word (see the module docstring).

  Single letters are dropped: they are the leftovers of "8k", "3d" or "it's".
  """
  return len(word) > 1 and word not in NON_CONTENT_WORDS


def content_words(text: str) -> list[str]:
  """The content words of `text` in order of first occurrence, no repeats."""
  return list(dict.fromkeys(
      word for word in tokenize_words(text) if is_content_word(word)))


def _check_prompts(prompts: Iterable[str]) -> None:
  if isinstance(prompts, str):
    raise TypeError('expected an iterable of prompts, got a single string')


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """An ordered set of content words; position i is output i of the head.

  Attributes:
    words: the words, most frequent in the training prompts first.
    index: word -> position in `words` (read-only).
  """

  words: tuple[str, ...]
  index: Mapping[str, int] = dataclasses.field(
      init=False, repr=False, compare=False)

  def __post_init__(self):
    words = tuple(self.words)
    bad = [w for w in words if not isinstance(w, str) or not w]
    if bad:
      raise ValueError(f'vocabulary words must be non-empty strings: {bad[:5]}')
    duplicates = sorted(w for w, n in collections.Counter(words).items()
                        if n > 1)
    if duplicates:
      raise ValueError(f'vocabulary words repeat: {duplicates[:5]}')
    object.__setattr__(self, 'words', words)
    object.__setattr__(self, 'index', types.MappingProxyType(
        {word: i for i, word in enumerate(words)}))

  def __len__(self) -> int:
    return len(self.words)

  @classmethod
  def build(cls, prompts: Iterable[str], size: int = 1000) -> Vocabulary:
    """The `size` content words found in the most training prompts.

    Counts document frequency: a word counts once per prompt however often it
    repeats there, so one "very very very detailed" prompt cannot push a word
    up. Words are ordered by count, most frequent first, ties alphabetically,
    so the same prompts always give the same vocabulary. If there are fewer
    than `size` content words, all of them are kept.

    Args:
      prompts: the TRAINING prompts only; a word seen only in evaluation
        prompts must not enter the vocabulary.
      size: the largest number of words to keep, at least 1.
    """
    _check_prompts(prompts)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f'size must be a positive int, got {size!r}')
    document_frequency = collections.Counter()
    for prompt in prompts:
      document_frequency.update(content_words(prompt))
    ranked = sorted(document_frequency.items(), key=lambda kv: (-kv[1], kv[0]))
    return cls(tuple(word for word, _ in ranked[:size]))

  def words_of(self, prompt: str) -> list[str]:
    """The in-vocabulary words of `prompt`, in prompt order, no repeats."""
    return [word for word in content_words(prompt) if word in self.index]

  def multi_hot(self, prompts: Iterable[str]) -> np.ndarray:
    """uint8 [N, V] targets: 1 where word v of the vocabulary is in prompt n."""
    _check_prompts(prompts)
    prompts = list(prompts)
    labels_NxV = np.zeros((len(prompts), len(self.words)), np.uint8)
    for row, prompt in enumerate(prompts):
      columns = [self.index[word] for word in self.words_of(prompt)]
      labels_NxV[row, columns] = 1
    return labels_NxV

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the vocabulary as JSON, atomically (a crash leaves no half file).
    """
    path = pathlib.Path(path)
    payload = {
        'format': FILE_FORMAT,
        'version': FILE_VERSION,
        'counting': 'document_frequency',
        'words': list(self.words),
    }
    tmp_path = path.with_name(path.name + '.tmp')
    tmp_path.write_text(json.dumps(payload, indent=1) + '\n')
    os.replace(tmp_path, path)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
    """Reads a file written by `save`.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not JSON, not a vocabulary file, of another
        format version, or its word list is malformed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'vocabulary file not found: {path}')
    try:
      payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{path}: not a valid JSON vocabulary file ({e})') from e
    if not isinstance(payload, dict) or payload.get('format') != FILE_FORMAT:
      raise ValueError(
          f'{path}: not a vocabulary file (expected a JSON object with '
          f'"format": "{FILE_FORMAT}")')
    if payload.get('version') != FILE_VERSION:
      raise ValueError(
          f'{path}: vocabulary format version {payload.get("version")!r} is '
          f'not supported (expected {FILE_VERSION})')
    words = payload.get('words')
    if not isinstance(words, list):
      raise ValueError(f'{path}: "words" must be a list of strings')
    try:
      return cls(tuple(words))
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from e
