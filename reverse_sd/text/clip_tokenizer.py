"""CLIP's BPE tokenizer, as Stable Diffusion pipelines run it, on `tokenizers`.

Builds the same `tokenizers` pipeline as transformers 5's `CLIPTokenizer`
(which diffusers' `StableDiffusionPipeline` uses) from an SD folder's
`tokenizer/`:

* normalizer: NFC, runs of whitespace -> one space, lowercase;
* pre-tokenizer: CLIP's regex (`<|startoftext|>`, `<|endoftext|>`, the
  contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits, runs
  of other non-space characters; whitespace dropped), then GPT-2's byte-level
  mapping (every UTF-8 byte is a vocabulary character);
* model: BPE with the `</w>` end-of-word suffix, unknown pieces ->
  the unk token (`<|endoftext|>`);
* special tokens (bos, eos, unk, pad) matched in the raw text first, with
  transformers' flags: a token given as an AddedToken dict in
  tokenizer_config.json keeps its `normalized` flag (SD 1.x's Hub files,
  mimicked by tests/golden/tiny_sd, mark `<|startoftext|>` normalized, so
  '<|StartOfText|>' typed in a prompt becomes BOS there), a plain string is
  matched verbatim; the later entry
  wins (order bos, eos, unk, pad), and entries of tokenizer_config.json's
  `added_tokens_decoder` override them all. SD 2.x's pad token '!' is one of
  them, so in SD 2.x every '!' of a prompt is the single-character token '!'
  (id 0), never '!</w>', exactly as in transformers 5.

`encode` then adds `<|startoftext|>` ... `<|endoftext|>`, truncates the
content to `max_length - 2` tokens and pads with the pad token (SD 1.x:
`<|endoftext|>`, SD 2.x: '!') to `max_length` (tokenizer_config.json's
`model_max_length`, 77): `tokenizer(prompts, padding='max_length',
max_length=77, truncation=True).input_ids` of the pipeline.

Files read from the folder: `vocab.json` + `merges.txt` (the Hub's layout),
or else `tokenizer.json` (what transformers 5 `save_pretrained` writes; only
its BPE vocabulary and merges are used); special tokens and
`model_max_length` from `tokenizer_config.json`, else
`special_tokens_map.json`, else CLIP's defaults.

Known gaps (checked against transformers 5.24 in tests/test_clip_text.py):
ftfy text fixing and HTML unescaping, which OpenAI's original tokenizer and
transformers 4's slow `CLIPTokenizer` (when ftfy is installed) apply, are not
applied here, nor by transformers 5 (so '&amp;' stays five characters);
tokens added to a tokenizer beyond the vocabulary (textual inversion) are
refused, and the `added_tokens` flags inside a tokenizer.json are not read
(transformers 5 rebuilds them from tokenizer_config.json as done here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np
import tokenizers
from tokenizers import normalizers
from tokenizers import pre_tokenizers

VOCAB_FILE = 'vocab.json'
MERGES_FILE = 'merges.txt'
TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'
SPECIAL_TOKENS_FILE = 'special_tokens_map.json'

END_OF_WORD_SUFFIX = '</w>'
DEFAULT_MAX_LENGTH = 77
# transformers' CLIPTokenizer defaults.
_DEFAULT_SPECIAL_TOKENS = {'bos_token': '<|startoftext|>',
                           'eos_token': '<|endoftext|>',
                           'unk_token': '<|endoftext|>',
                           'pad_token': '<|endoftext|>'}
# transformers adds the special tokens in this order; a later one wins.
_SPECIAL_TOKEN_ORDER = ('bos_token', 'eos_token', 'unk_token', 'pad_token')
_CLIP_SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|"""
                       r"""'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

_EXPECTED_FILES = (f'{VOCAB_FILE} and {MERGES_FILE} (or a {TOKENIZER_FILE}), '
                   f'with {TOKENIZER_CONFIG_FILE} or {SPECIAL_TOKENS_FILE}')


@dataclasses.dataclass(frozen=True)
class _SpecialToken:
  content: str
  normalized: bool = False
  lstrip: bool = False
  rstrip: bool = False
  single_word: bool = False


class ClipTokenizer:
  """CLIP BPE tokenizer: prompts -> padded token ids [N, max_length].

  Build it with `ClipTokenizer.from_dir(<sd_dir>/tokenizer)`.

  Attributes:
    max_length: padded length (77 for Stable Diffusion).
    bos_id, eos_id, pad_id: ids of <|startoftext|>, <|endoftext|> and the pad
      token.
    vocab_size: size of the BPE vocabulary (specials included).
  """

  def __init__(self, vocab: Mapping[str, int],
               merges: Sequence[tuple[str, str]],
               special_tokens: Mapping[str, _SpecialToken], *,
               added_tokens: Sequence[_SpecialToken] = (),
               max_length: int = DEFAULT_MAX_LENGTH,
               source_name: str = '<tokenizer>'):
    if max_length < 2:
      raise ValueError(f'{source_name}: max_length {max_length} leaves no '
                       'room for <|startoftext|> and <|endoftext|>')
    missing = {name: token.content for name, token in special_tokens.items()
               if token.content not in vocab}
    missing.update({'added token': token.content for token in added_tokens
                    if token.content not in vocab})
    if missing:
      raise ValueError(f'{source_name}: special tokens {missing} are not in '
                       'the vocabulary (tokens beyond the vocabulary, e.g. '
                       'textual inversion, are not supported)')
    model = tokenizers.models.BPE(
        vocab=dict(vocab), merges=list(merges), dropout=None,
        continuing_subword_prefix='', end_of_word_suffix=END_OF_WORD_SUFFIX,
        fuse_unk=False, unk_token=special_tokens['unk_token'].content)
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
        normalizers.Lowercase(),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_CLIP_SPLIT_PATTERN),
                             behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(
            token.content, single_word=token.single_word, lstrip=token.lstrip,
            rstrip=token.rstrip, normalized=token.normalized, special=True)
        for token in (*(special_tokens[name] for name in
                        _SPECIAL_TOKEN_ORDER), *added_tokens)
    ])
    self._tokenizer = tokenizer
    self.max_length = max_length
    self.vocab_size = len(vocab)
    self.bos_id = vocab[special_tokens['bos_token'].content]
    self.eos_id = vocab[special_tokens['eos_token'].content]
    self.pad_id = vocab[special_tokens['pad_token'].content]

  @classmethod
  def from_dir(cls, tokenizer_dir: str | os.PathLike[str]) -> ClipTokenizer:
    """Reads a `tokenizer/` folder (see the module docstring for the files).

    Raises:
      FileNotFoundError: the folder or its vocabulary files are missing
        (says which files are expected).
      ValueError: a file is not valid JSON / not a BPE vocabulary, or a
        special token is not in the vocabulary.
    """
    tokenizer_dir = pathlib.Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
      raise FileNotFoundError(
          f'CLIP tokenizer folder not found: {tokenizer_dir} (expected '
          f'{_EXPECTED_FILES} there).')
    vocab, merges, source = _read_bpe(tokenizer_dir)
    settings = _read_settings(tokenizer_dir)
    special_tokens = {
        name: _special_token(settings.get(name, default),
                             source_name=f'{tokenizer_dir}: {name}')
        for name, default in _DEFAULT_SPECIAL_TOKENS.items()}
    added_tokens = _added_tokens(settings.get('added_tokens_decoder', {}),
                                 vocab, source_name=str(tokenizer_dir))
    max_length = settings.get('model_max_length', DEFAULT_MAX_LENGTH)
    if not isinstance(max_length, int) or max_length > 10**6:
      # transformers writes a huge number when no length is set.
      max_length = DEFAULT_MAX_LENGTH
    return cls(vocab, merges, special_tokens, added_tokens=added_tokens,
               max_length=max_length, source_name=source)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Content token ids of each text (no special tokens, no truncation)."""
    if isinstance(texts, str):
      raise TypeError('tokenize expects a sequence of strings, got one str')
    encodings = self._tokenizer.encode_batch(list(texts),
                                             add_special_tokens=False)
    return [encoding.ids for encoding in encodings]

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids as Stable Diffusion feeds them to the text encoder.

    Returns:
      int32 [N, max_length]: <|startoftext|>, at most max_length - 2 content
      tokens, <|endoftext|>, then the pad token.
    """
    ids_NxT = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for row, content in zip(ids_NxT, self.tokenize(texts)):
      content = content[:self.max_length - 2]
      row[:len(content) + 2] = [self.bos_id, *content, self.eos_id]
    return ids_NxT

  __call__ = encode


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e


def _read_bpe(tokenizer_dir: pathlib.Path
              ) -> tuple[dict[str, int], list[tuple[str, str]], str]:
  """(vocab, merges, source name): vocab.json + merges.txt or tokenizer.json."""
  vocab_path = tokenizer_dir / VOCAB_FILE
  merges_path = tokenizer_dir / MERGES_FILE
  if vocab_path.is_file() and merges_path.is_file():
    vocab = _read_json(vocab_path)
    merges = _parse_merges(
        merges_path.read_text(encoding='utf-8').splitlines(), str(merges_path))
    return _check_vocab(vocab, str(vocab_path)), merges, str(vocab_path)
  json_path = tokenizer_dir / TOKENIZER_FILE
  if json_path.is_file():
    model = _read_json(json_path).get('model') or {}
    if model.get('type') != 'BPE' or model.get(
        'end_of_word_suffix') != END_OF_WORD_SUFFIX:
      raise ValueError(
          f'{json_path}: not a CLIP tokenizer (model type '
          f'{model.get("type")!r}, end_of_word_suffix '
          f'{model.get("end_of_word_suffix")!r}; expected BPE with '
          f'{END_OF_WORD_SUFFIX!r})')
    merges = [m if isinstance(m, str) else ' '.join(m)
              for m in model.get('merges', [])]
    return (_check_vocab(model.get('vocab'), str(json_path)),
            _parse_merges(merges, str(json_path)), str(json_path))
  present = sorted(p.name for p in tokenizer_dir.iterdir())
  raise FileNotFoundError(
      f'{tokenizer_dir}: no CLIP vocabulary; expected {_EXPECTED_FILES}, '
      f'found {present}.')


def _check_vocab(vocab: Any, source_name: str) -> dict[str, int]:
  if not isinstance(vocab, dict) or not all(
      isinstance(i, int) for i in vocab.values()):
    raise ValueError(f'{source_name}: expected a {{token: id}} vocabulary')
  return vocab


def _parse_merges(lines: Sequence[str], source_name: str
                  ) -> list[tuple[str, str]]:
  merges = []
  for number, line in enumerate(lines, start=1):
    if not line or (number == 1 and line.startswith('#version')):
      continue
    pair = line.split(' ')
    if len(pair) != 2:
      raise ValueError(f'{source_name}: merge {number} is {line!r}; expected '
                       "two space-separated pieces")
    merges.append((pair[0], pair[1]))
  return merges


def _read_settings(tokenizer_dir: pathlib.Path) -> dict[str, Any]:
  """Special tokens and model_max_length: tokenizer_config.json first."""
  settings: dict[str, Any] = {}
  for name in (SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE):
    path = tokenizer_dir / name
    if path.is_file():
      content = _read_json(path)
      if not isinstance(content, dict):
        raise ValueError(f'{path}: expected a JSON object')
      settings.update({key: value for key, value in content.items()
                       if value is not None})
  return settings


def _special_token(value: Any, *, source_name: str) -> _SpecialToken:
  """A special token from a plain string or an AddedToken dict."""
  if isinstance(value, str):
    return _SpecialToken(value)
  if isinstance(value, dict) and isinstance(value.get('content'), str):
    return _SpecialToken(
        value['content'], normalized=bool(value.get('normalized', False)),
        lstrip=bool(value.get('lstrip', False)),
        rstrip=bool(value.get('rstrip', False)),
        single_word=bool(value.get('single_word', False)))
  raise ValueError(f'{source_name}: expected a string or an AddedToken dict '
                   f'with "content", got {value!r}')


def _added_tokens(decoder: Any, vocab: Mapping[str, int], *,
                  source_name: str) -> list[_SpecialToken]:
  """tokenizer_config.json's `added_tokens_decoder` ({id: AddedToken dict})."""
  if not isinstance(decoder, dict):
    raise ValueError(f'{source_name}: added_tokens_decoder is not a JSON '
                     'object')
  tokens = []
  for token_id, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
    token = _special_token(value,
                           source_name=f'{source_name}: added token {token_id}')
    if token.content in vocab and vocab[token.content] != int(token_id):
      raise ValueError(
          f'{source_name}: added_tokens_decoder gives {token.content!r} id '
          f'{token_id}, the vocabulary {vocab[token.content]}')
    tokens.append(token)
  return tokens
