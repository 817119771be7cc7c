"""Mapping table: Hugging Face BERT / MiniLM safetensors -> `BertEncoder`.

Source keys are those of `transformers.BertModel` (`embeddings.*`,
`encoder.layer.{i}.*`, `pooler.*`), optionally under a prefix such as `bert.`
(task heads) or `0.auto_model.` (a sentence-transformers state dict). Target
paths are those of `reverse_sd.text.minilm.BertEncoder`'s 'params'
collection.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from reverse_sd.convert import core

# Tried in this order; the first under which the word embeddings exist wins.
PREFIXES = ('', 'bert.', '0.auto_model.', 'model.')
_ANCHOR = 'embeddings.word_embeddings.weight'

# Source keys that are deliberately unused: the position_ids buffer and the
# [CLS] pooler, which mean-pooling sentence encoders do not use.
IGNORED = (
    r'embeddings\.position_ids',
    r'embeddings\.token_type_ids',
    r'pooler\.dense\.(weight|bias)',
)


_layer_norm = core.layer_norm_rules
_dense = core.dense_rules


def bert_rules(num_layers: int) -> list[core.Rule]:
  """The full table for a BERT encoder with `num_layers` layers."""
  rules = [
      core.Rule('embeddings.word_embeddings.weight',
                'embeddings/word_embeddings/embedding'),
      core.Rule('embeddings.position_embeddings.weight',
                'embeddings/position_embeddings/embedding'),
      core.Rule('embeddings.token_type_embeddings.weight',
                'embeddings/token_type_embeddings/embedding'),
      *_layer_norm('embeddings.LayerNorm', 'embeddings/layer_norm'),
  ]
  for i in range(num_layers):
    source, target = f'encoder.layer.{i}', f'layer_{i}'
    rules += [
        *_dense(f'{source}.attention.self.query', f'{target}/attention/query'),
        *_dense(f'{source}.attention.self.key', f'{target}/attention/key'),
        *_dense(f'{source}.attention.self.value', f'{target}/attention/value'),
        *_dense(f'{source}.attention.output.dense',
                f'{target}/attention/output'),
        *_layer_norm(f'{source}.attention.output.LayerNorm',
                     f'{target}/attention_layer_norm'),
        *_dense(f'{source}.intermediate.dense', f'{target}/intermediate'),
        *_dense(f'{source}.output.dense', f'{target}/output'),
        *_layer_norm(f'{source}.output.LayerNorm',
                     f'{target}/output_layer_norm'),
    ]
  return rules


def convert_bert(tensors: Mapping[str, np.ndarray],
                 abstract_params: Mapping[str, Any], *, num_layers: int,
                 source_name: str = '<checkpoint>') -> dict[str, Any]:
  """Converts a HF BERT state dict into `BertEncoder` params.

  Args:
    tensors: flat {key: array}, e.g. from `core.load_safetensors`.
    abstract_params: the 'params' collection of `BertEncoder`, abstract (from
      `jax.eval_shape`) or concrete.
    num_layers: number of encoder layers of the target model.
    source_name: file name for error messages.

  Returns:
    The nested param dict (numpy arrays) for `BertEncoder`.

  Raises:
    core.ConversionError: a key is missing, unused or has the wrong shape.
  """
  prefix = core.detect_prefix(tensors.keys(), _ANCHOR, PREFIXES,
                              source_name=source_name)
  return core.convert(tensors, bert_rules(num_layers), abstract_params,
                      ignore=IGNORED, prefix=prefix, source_name=source_name)
