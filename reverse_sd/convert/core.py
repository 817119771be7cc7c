"""Table-driven conversion of PyTorch-style checkpoints into Flax param trees.

A converter is a mapping table: a list of `Rule`s, each naming one source
tensor (a key of a flat safetensors dict), the target leaf of the Flax param
tree it fills ('/'-joined path) and a transform (for example a transpose for a
Dense kernel). Tables for repeated blocks are written with plain Python loops
over layer indices, so every key is spelled out and a missing one can be named.

`convert` checks the whole table against the source tensors and the abstract
target params (from `jax.eval_shape(module.init, ...)`):

* every rule's source key exists in the checkpoint;
* every source key is consumed by a rule or matches an explicit ignore pattern
  (buffers such as `position_ids`, heads the model does not use);
* every target leaf is filled exactly once, and no rule names a leaf that the
  model does not have;
* every transformed tensor has exactly the target leaf's shape.

All problems are collected and reported together in one `ConversionError`
naming the file, the key, and the expected and actual shapes.

Checkpoints are read with `safetensors.numpy.load_file`: never unpickled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

Transform = Callable[[np.ndarray], np.ndarray]

# At most this many problems are listed in one error message.
_MAX_LISTED_PROBLEMS = 20


class ConversionError(ValueError):
  """A checkpoint does not fit the target model or the mapping table."""


# --- Transforms ---------------------------------------------------------------


def identity(x: np.ndarray) -> np.ndarray:
  """Copies the tensor unchanged (biases, LayerNorm params, embeddings)."""
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """PyTorch `nn.Linear` weight [out, in] -> Flax `nn.Dense` kernel [in, out]."""
  if x.ndim != 2:
    raise ValueError(f'transpose expects a 2-D linear weight, got {x.ndim}-D')
  return x.T


def conv_kernel(x: np.ndarray) -> np.ndarray:
  """PyTorch conv weight [O, I, *spatial] -> Flax `nn.Conv` [*spatial, I, O]."""
  if x.ndim < 3:
    raise ValueError(f'conv_kernel expects an N-D conv weight, got {x.ndim}-D')
  spatial = tuple(range(2, x.ndim))
  return x.transpose(*spatial, 1, 0)


def reshape(*shape: int) -> Transform:
  """Returns a transform reshaping to `shape` (e.g. a bias [H*D] -> [H, D])."""

  def _reshape(x: np.ndarray) -> np.ndarray:
    return x.reshape(shape)

  _reshape.__name__ = f'reshape{shape}'
  return _reshape


def chain(*transforms: Transform) -> Transform:
  """Applies `transforms` left to right, e.g. `chain(transpose, reshape(...))`."""

  def _chain(x: np.ndarray) -> np.ndarray:
    for transform in transforms:
      x = transform(x)
    return x

  _chain.__name__ = '+'.join(_transform_name(t) for t in transforms)
  return _chain


def _transform_name(transform: Transform) -> str:
  return getattr(transform, '__name__', repr(transform))


# --- Tables -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """One source tensor -> one target param leaf.

  Attributes:
    source: exact key in the source checkpoint (after prefix stripping).
    target: '/'-joined path of the leaf in the Flax param tree, e.g.
      'encoder/layer_0/attention/query/kernel'.
    transform: maps the source array to the target layout; its result must
      have exactly the target leaf's shape.
  """

  source: str
  target: str
  transform: Transform = identity


def layer_norm_rules(source: str, target: str) -> list[Rule]:
  """Rules for a PyTorch LayerNorm (or GroupNorm) -> a Flax norm's params.

  `{source}.weight` -> `{target}/scale`, `{source}.bias` -> `{target}/bias`.
  """
  return [
      Rule(f'{source}.weight', f'{target}/scale'),
      Rule(f'{source}.bias', f'{target}/bias'),
  ]


def dense_rules(source: str, target: str) -> list[Rule]:
  """Rules for a PyTorch `nn.Linear` -> a Flax `nn.Dense`'s params.

  `{source}.weight` -> `{target}/kernel`, transposed ([out, in] -> [in, out]);
  `{source}.bias` -> `{target}/bias`.
  """
  return [
      Rule(f'{source}.weight', f'{target}/kernel', transpose),
      Rule(f'{source}.bias', f'{target}/bias'),
  ]


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a safetensors file into a flat dict of numpy arrays (no pickle).

  Raises:
    FileNotFoundError: the file does not exist.
    ConversionError: the file is not a readable safetensors file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'Checkpoint file not found: {path}')
  try:
    return safetensors.numpy.load_file(str(path))
  except TypeError:
    # numpy has no bfloat16: safetensors.numpy cannot read bf16 checkpoints.
    return _read_safetensors_upcast(path)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise ConversionError(
        f'{path}: not a readable safetensors file ({e})') from e


_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


def _read_safetensors_upcast(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads the safetensors layout directly (8-byte header size, JSON header,
  raw little-endian data); bfloat16 tensors come back as float32."""
  try:
    with open(path, 'rb') as f:
      header_size = int.from_bytes(f.read(8), 'little')
      header = json.loads(f.read(header_size))
      data = f.read()
    out = {}
    for key, entry in header.items():
      if key == '__metadata__':
        continue
      dtype = _SAFETENSORS_DTYPES[entry['dtype']]
      start, stop = entry['data_offsets']
      array = np.frombuffer(data[start:stop], dtype=dtype).reshape(
          entry['shape'])
      out[key] = (array.astype(np.float32) if dtype == ml_dtypes.bfloat16
                  else array.copy())
    return out
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConversionError(
        f'{path}: not a readable safetensors file ({type(e).__name__}: {e})'
    ) from e


def detect_prefix(keys: Iterable[str], anchor: str,
                  candidates: Sequence[str], *,
                  source_name: str = '<checkpoint>') -> str:
  """Returns the candidate prefix p for which p + anchor is one of `keys`.

  Args:
    keys: source checkpoint keys.
    anchor: a key every supported checkpoint has, without prefix, e.g.
      'embeddings.word_embeddings.weight'.
    candidates: prefixes to try in order, e.g. ('', 'bert.').
    source_name: the file name used in error messages.

  Raises:
    ConversionError: no candidate prefix matches.
  """
  keys = set(keys)
  for prefix in candidates:
    if prefix + anchor in keys:
      return prefix
  raise ConversionError(
      f'{source_name}: cannot find {anchor!r} under any of the prefixes '
      f'{list(candidates)}; is this the right kind of checkpoint? First keys: '
      f'{sorted(keys)[:5]}')


def flatten_params(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Flattens a nested dict of params into {'a/b/c': leaf}."""
  flat = {}
  for name, value in tree.items():
    path = f'{prefix}/{name}' if prefix else str(name)
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, path))
    else:
      flat[path] = value
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten_params`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def convert(
    tensors: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    abstract_params: Mapping[str, Any],
    *,
    ignore: Sequence[str] = (),
    prefix: str = '',
    source_name: str = '<checkpoint>',
) -> dict[str, Any]:
  """Builds a Flax param tree from a flat checkpoint and a mapping table.

  Args:
    tensors: flat {key: array} source checkpoint, e.g. from `load_safetensors`.
    rules: the mapping table; rule sources are keys without `prefix`.
    abstract_params: nested dict whose leaves have `.shape` and `.dtype`
      (the output of `jax.eval_shape(module.init, ...)`, or real params). The
      result has the same nesting; a top-level 'params' collection is kept.
    ignore: regular expressions (full match, applied to keys without
      `prefix`) for source keys that are deliberately not used.
    prefix: stripped from the source keys that start with it (e.g. 'bert.').
    source_name: the file name used in error messages.

  Returns:
    A nested dict of numpy arrays with exactly the structure, shapes and
    dtypes of `abstract_params`.

  Raises:
    ConversionError: listing every missing, unused, duplicated or
      wrong-shaped key, naming `source_name`.
  """
  # Strip the prefix, remembering the original key for messages.
  original = {}
  for key in tensors:
    short = key[len(prefix):] if prefix and key.startswith(prefix) else key
    if short in original:
      raise ConversionError(
          f'{source_name}: keys {original[short]!r} and {key!r} both map to '
          f'{short!r} after stripping prefix {prefix!r}')
    original[short] = key

  targets = flatten_params(abstract_params)
  ignore_patterns = [re.compile(pattern) for pattern in ignore]
  problems: list[str] = []
  filled: dict[str, np.ndarray] = {}
  filled_by: dict[str, str] = {}
  consumed: set[str] = set()

  for rule in rules:
    key = prefix + rule.source if prefix else rule.source
    if rule.target not in targets:
      problems.append(
          f'rule {rule.source!r} -> {rule.target!r}: the model has no param '
          f'{rule.target!r} (mapping table out of date?)')
      continue
    expected = tuple(targets[rule.target].shape)
    if rule.source not in original:
      problems.append(f'missing key {key!r}: {_expected(rule, expected)}')
      continue
    if rule.target in filled_by:
      problems.append(
          f'{rule.target!r} is filled twice: from {filled_by[rule.target]!r} '
          f'and {key!r}')
      continue
    source = tensors[original[rule.source]]
    try:
      value = np.asarray(rule.transform(source))
    except ValueError as e:
      problems.append(
          f'key {key!r} has shape {tuple(source.shape)}; '
          f'{_expected(rule, expected)} ({e})')
      continue
    if tuple(value.shape) != expected:
      problems.append(
          f'key {key!r} has shape {tuple(source.shape)}; '
          f'{_expected(rule, expected)}')
      continue
    consumed.add(rule.source)
    filled_by[rule.target] = key
    filled[rule.target] = value.astype(targets[rule.target].dtype, copy=False)

  for short in sorted(original):
    if short in consumed or any(p.fullmatch(short) for p in ignore_patterns):
      continue
    if any(r.source == short for r in rules):
      continue  # Already reported (wrong shape or duplicate).
    problems.append(
        f'unused key {original[short]!r} with shape '
        f'{tuple(tensors[original[short]].shape)}: no rule consumes it and it '
        f'is not listed as ignored')

  rule_targets = {rule.target for rule in rules}
  for path in sorted(targets):
    if path not in rule_targets:
      problems.append(
          f'param {path!r} (shape {tuple(targets[path].shape)}) has no rule in '
          f'the mapping table')

  if problems:
    listed = problems[:_MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    raise ConversionError(
        f'{source_name}: cannot convert checkpoint ({len(problems)} '
        f'problem(s)):\n  ' + '\n  '.join(listed) +
        (f'\n  ... and {more} more' if more else ''))
  return unflatten_params(filled)


def _expected(rule: Rule, target_shape: tuple[int, ...]) -> str:
  """Describes the source shape a rule needs to fill `target_shape`."""
  target = f'{rule.target!r} of shape {target_shape}'
  if rule.transform is identity:
    return f'expected shape {target_shape} for {target}'
  if rule.transform is transpose and len(target_shape) == 2:
    return (f'expected shape {target_shape[::-1]} for {target} (after '
            'transpose)')
  if rule.transform is conv_kernel and len(target_shape) >= 3:
    source_shape = (target_shape[-1], target_shape[-2], *target_shape[:-2])
    return f'expected shape {source_shape} for {target} (after conv_kernel)'
  return f'expected {target} after {_transform_name(rule.transform)}'
