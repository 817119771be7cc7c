"""SD text encoder (CLIP text transformer + tokenizer) against transformers.

The fixtures (tests/golden/tiny_sd{,2}/{text_encoder,tokenizer}/ and
sd_text_golden.npz) are written by tools/reference/make_sd_text_golden.py in
the reference environment (transformers 5.24, diffusers 0.42.1). tiny_sd has
transformers 5's bare key layout and the Hub's vocab.json/merges.txt
tokenizer; tiny_sd2 has the Hub's transformers 4 `text_model.*` layout and a
transformers 5 tokenizer.json, pad token '!'. If a parity test fails, check:
token ids first (tokenizer), then the mapping table, the activation and eps
read from config.json, the causal mask, and the EOS pooling rule.

Measured max |Flax - HF| (float32, CPU; outputs of magnitude ~3):
last_hidden_state <= 1.5e-6, pooled <= 1e-6, the encode_prompt('') context
<= 1.5e-6, for both tiny models; token ids identical for every golden prompt.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reverse_sd.convert import clip_text_weights as clip_text_convert
from reverse_sd.convert import core
from reverse_sd.models import clip_text
from reverse_sd.text import clip_tokenizer
from reverse_sd.text import sd_context

GOLDEN_DIR = pathlib.Path(__file__).parent / 'golden'
SD_DIRS = {'sd1': GOLDEN_DIR / 'tiny_sd', 'sd2': GOLDEN_DIR / 'tiny_sd2'}
ATOL = 1e-4


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN_DIR / 'sd_text_golden.npz', allow_pickle=False) as data:
    return {name: data[name] for name in data.files}


@pytest.fixture(scope='module')
def text_towers():
  """{name: (config, params, jitted apply)} of both tiny text encoders."""
  towers = {}
  for name, sd_dir in SD_DIRS.items():
    config, params = clip_text_convert.load_clip_text(sd_dir / 'text_encoder')
    model = clip_text.ClipTextTransformer(config)
    towers[name] = (config, params, jax.jit(model.apply))
  return towers


def _check(actual, expected, what):
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  diff = float(np.abs(actual - expected).max())
  assert diff <= ATOL, f'{what}: max |Flax - HF| = {diff:.3g} > {ATOL}'


def _copy_sd_dir(tmp_path, name='sd1'):
  """A copy of the text half of a tiny SD folder (safe to modify)."""
  sd_dir = tmp_path / 'sd'
  for sub in ('text_encoder', 'tokenizer'):
    shutil.copytree(SD_DIRS[name] / sub, sd_dir / sub)
  return sd_dir


def test_golden_records_versions(golden):
  versions = json.loads(str(golden['versions_json']))
  assert versions['transformers'].startswith('5.'), versions
  assert versions['diffusers'].startswith('0.'), versions


# --- Tokenizer ----------------------------------------------------------------


@pytest.mark.parametrize('name', ['sd1', 'sd2'])
def test_token_ids_match_transformers(golden, name):
  tokenizer = clip_tokenizer.ClipTokenizer.from_dir(SD_DIRS[name] /
                                                     'tokenizer')
  ids = tokenizer.encode(list(golden['prompts']))
  expected = golden[f'{name}_input_ids']
  assert ids.shape == expected.shape == (len(golden['prompts']), 77)
  for prompt, row, expected_row in zip(golden['prompts'], ids, expected):
    bad = np.flatnonzero(row != expected_row)
    assert not bad.size, (
        f'{name} prompt {str(prompt)!r}: ids differ from CLIPTokenizer from '
        f'position {bad[0]}: {row[:bad[0] + 3].tolist()} vs '
        f'{expected_row[:bad[0] + 3].tolist()}')


def test_tokenizer_special_tokens_and_truncation(golden):
  sd1 = clip_tokenizer.ClipTokenizer.from_dir(SD_DIRS['sd1'] / 'tokenizer')
  sd2 = clip_tokenizer.ClipTokenizer.from_dir(SD_DIRS['sd2'] / 'tokenizer')
  assert sd1.max_length == sd2.max_length == 77
  assert (sd1.bos_id, sd1.eos_id) == (sd2.bos_id, sd2.eos_id)
  assert sd1.pad_id == sd1.eos_id  # SD 1.x pads with <|endoftext|>.
  assert sd2.pad_id == 0  # SD 2.x pads with '!', id 0 as in the real vocab.
  empty = sd2.encode([''])[0]
  assert empty[:3].tolist() == [sd2.bos_id, sd2.eos_id, 0]
  # The golden really exercises truncation: EOS is kept at the last position.
  assert int(golden['sd2_untruncated_length']) > 77
  long_index = list(golden['prompts']).index(max(golden['prompts'], key=len))
  assert sd1.encode([golden['prompts'][long_index]])[0, -1] == sd1.eos_id


def test_added_tokens_decoder_flags_override(golden, tmp_path):
  """tokenizer_config.json's added_tokens_decoder wins, as in transformers 5.

  With <|startoftext|> not normalized, '<|StartOfText|>' typed in a prompt
  is plain text: the ids are then those of the sd2 tokenizer (same
  vocabulary, specials not normalized), up to the padding.
  """
  sd_dir = _copy_sd_dir(tmp_path)
  config_path = sd_dir / 'tokenizer' / 'tokenizer_config.json'
  config = json.loads(config_path.read_text())
  vocab = json.loads((sd_dir / 'tokenizer' / 'vocab.json').read_text())
  config['added_tokens_decoder'] = {
      str(vocab[content]): dict(content=content, lstrip=False,
                                normalized=False, rstrip=False,
                                single_word=False, special=True)
      for content in ('<|startoftext|>', '<|endoftext|>')}
  config_path.write_text(json.dumps(config))
  tokenizer = clip_tokenizer.ClipTokenizer.from_dir(sd_dir / 'tokenizer')
  index = [i for i, p in enumerate(golden['prompts']) if 'StartOfText' in p]
  ids = tokenizer.encode([golden['prompts'][index[0]]])[0]
  expected = golden['sd2_input_ids'][index[0]].copy()
  expected[expected == 0] = tokenizer.pad_id
  np.testing.assert_array_equal(ids, expected)
  assert (ids != golden['sd1_input_ids'][index[0]]).any()


def test_tokenizer_missing_files_is_a_clear_error(tmp_path):
  (tmp_path / 'tokenizer').mkdir()
  (tmp_path / 'tokenizer' / 'tokenizer_config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r'vocab\.json and merges\.txt'):
    clip_tokenizer.ClipTokenizer.from_dir(tmp_path / 'tokenizer')
  with pytest.raises(FileNotFoundError, match='not found'):
    clip_tokenizer.ClipTokenizer.from_dir(tmp_path / 'nowhere')


def test_tokenizer_special_token_not_in_vocab(tmp_path):
  sd_dir = _copy_sd_dir(tmp_path)
  config_path = sd_dir / 'tokenizer' / 'tokenizer_config.json'
  config = json.loads(config_path.read_text())
  config['pad_token'] = '<pad>'
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="'pad_token': '<pad>'"):
    clip_tokenizer.ClipTokenizer.from_dir(sd_dir / 'tokenizer')


# --- Text transformer ---------------------------------------------------------


@pytest.mark.parametrize('name', ['sd1', 'sd2'])
def test_last_hidden_state_and_pooled_match_transformers(golden, text_towers,
                                                         name):
  config, params, apply = text_towers[name]
  ids = golden[f'{name}_input_ids'][golden['hidden_prompts']]
  out = apply({'params': params}, ids)
  _check(np.asarray(out.last_hidden_state),
         golden[f'{name}_last_hidden_state'], f'{name} last_hidden_state')
  _check(np.asarray(out.pooled), golden[f'{name}_pooled'], f'{name} pooled')
  # sd1 pools at the first <|endoftext|> (current eos_token_id), sd2 at the
  # highest id (SD 2.1's legacy eos_token_id 2): both rules are covered.
  assert (config.eos_token_id == clip_text.LEGACY_EOS_TOKEN_ID) == (
      name == 'sd2')


@pytest.mark.parametrize('name', ['sd1', 'sd2'])
def test_context_width_is_unet_cross_attention_dim(text_towers, name):
  unet_config = json.loads(
      (SD_DIRS[name] / 'unet' / 'config.json').read_text())
  assert text_towers[name][0].width == unet_config['cross_attention_dim']


def test_configs_read_from_config_json():
  sd1 = clip_text_convert.read_config(SD_DIRS['sd1'] / 'text_encoder')
  sd2 = clip_text_convert.read_config(SD_DIRS['sd2'] / 'text_encoder')
  assert (sd1.activation, sd2.activation) == ('quick_gelu', 'gelu')
  assert (sd1.width, sd1.layers, sd1.heads, sd1.mlp_dim) == (32, 2, 2, 64)
  assert (sd2.width, sd2.layers, sd2.heads, sd2.mlp_dim) == (48, 2, 3, 96)
  assert sd1.max_positions == sd2.max_positions == 77
  with pytest.raises(ValueError, match="model_type 'bert'"):
    clip_text_convert.text_config_from_hf(
        {'model_type': 'bert', 'hidden_size': 8}, source_name='x.json')


@pytest.mark.parametrize('variant,params', [('sd1', 123_060_480),
                                            ('sd2', 340_387_840)])
def test_real_variant_sizes(variant, params):
  """The released SD text encoders' parameter counts (shapes only)."""
  abstract = clip_text_convert.abstract_params(clip_text.VARIANTS[variant])
  count = sum(leaf.size for leaf in jax.tree.leaves(abstract))
  assert count == params


# --- Converter ----------------------------------------------------------------


def test_both_key_layouts_convert_to_the_same_params():
  tensors = load_file(str(SD_DIRS['sd1'] / 'text_encoder' /
                          'model.safetensors'))
  assert 'embeddings.token_embedding.weight' in tensors  # transformers 5.
  config = clip_text_convert.read_config(SD_DIRS['sd1'] / 'text_encoder')
  abstract = clip_text_convert.abstract_params(config)
  bare = clip_text_convert.convert_clip_text(tensors, abstract,
                                             num_layers=config.layers)
  legacy_tensors = {f'text_model.{k}': v for k, v in tensors.items()}
  legacy_tensors['text_model.embeddings.position_ids'] = np.arange(
      77, dtype=np.int64)[None]
  legacy = clip_text_convert.convert_clip_text(legacy_tensors, abstract,
                                               num_layers=config.layers)
  jax.tree.map(np.testing.assert_array_equal, bare, legacy)
  sd2_keys = load_file(str(SD_DIRS['sd2'] / 'text_encoder' /
                           'model.safetensors'))
  assert 'text_model.embeddings.position_ids' in sd2_keys  # transformers 4.


def _convert(tensors):
  config = clip_text_convert.read_config(SD_DIRS['sd1'] / 'text_encoder')
  return clip_text_convert.convert_clip_text(
      tensors, clip_text_convert.abstract_params(config),
      num_layers=config.layers, source_name='model.safetensors')


@pytest.fixture()
def sd1_tensors():
  return load_file(str(SD_DIRS['sd1'] / 'text_encoder' / 'model.safetensors'))


def test_converter_refuses_wrong_shape(sd1_tensors):
  key = 'encoder.layers.1.mlp.fc1.weight'
  sd1_tensors[key] = np.zeros((63, 32), np.float16)
  with pytest.raises(core.ConversionError) as error:
    _convert(sd1_tensors)
  message = str(error.value)
  assert f"key '{key}' has shape (63, 32)" in message, message
  assert 'expected shape (64, 32)' in message, message


def test_converter_refuses_missing_key(sd1_tensors):
  del sd1_tensors['final_layer_norm.bias']
  with pytest.raises(core.ConversionError,
                     match="missing key 'final_layer_norm.bias'"):
    _convert(sd1_tensors)


def test_converter_refuses_extra_key(sd1_tensors):
  sd1_tensors['encoder.layers.2.mlp.fc1.weight'] = np.zeros((64, 32),
                                                            np.float32)
  with pytest.raises(core.ConversionError, match=(
      r"unused key 'encoder\.layers\.2\.mlp\.fc1\.weight'")):
    _convert(sd1_tensors)


def test_converter_names_the_tower_size_of_another_checkpoint(sd1_tensors):
  config = clip_text_convert.read_config(SD_DIRS['sd2'] / 'text_encoder')
  with pytest.raises(core.ConversionError, match=r'\(634, 32\) and 2 layers'):
    clip_text_convert.convert_clip_text(
        sd1_tensors, clip_text_convert.abstract_params(config),
        num_layers=config.layers, source_name='model.safetensors')


def test_not_a_text_checkpoint():
  with pytest.raises(core.ConversionError,
                     match='embeddings.token_embedding.weight'):
    _convert({'foo.weight': np.zeros(3, np.float32)})


# --- SD context ---------------------------------------------------------------


def test_encode_prompts_matches_transformers(golden):
  prompts = [str(p) for p in golden['prompts'][golden['hidden_prompts']]]
  # batch_size 4 over 6 prompts: the padded last batch is cut off again.
  context = sd_context.encode_prompts(SD_DIRS['sd2'], prompts, batch_size=4)
  assert context.dtype == np.float32
  _check(context, golden['sd2_last_hidden_state'], 'sd2 encode_prompts')


@pytest.mark.parametrize('name', ['sd1', 'sd2'])
def test_empty_prompt_context_matches_pipeline(golden, tmp_path, monkeypatch,
                                               name):
  monkeypatch.setenv(sd_context.CACHE_DIR_ENV, str(tmp_path / 'cache'))
  context = sd_context.empty_prompt_context(SD_DIRS[name])
  _check(context, golden[f'{name}_empty_context'],
         f"{name} StableDiffusionPipeline.encode_prompt('')")


def test_empty_prompt_context_is_cached(golden, tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  monkeypatch.setenv(sd_context.CACHE_DIR_ENV, str(cache))
  sd_dir = _copy_sd_dir(tmp_path)
  first = sd_context.empty_prompt_context(sd_dir)
  files = sorted(p.name for p in (cache / 'sd_context').iterdir())
  assert len(files) == 2 and files[0].endswith('.json'), files

  def fail(*args, **kwargs):
    raise AssertionError('the cached context was recomputed')

  monkeypatch.setattr(sd_context, 'encode_prompts', fail)
  second = sd_context.empty_prompt_context(sd_dir)
  np.testing.assert_array_equal(first, second)
  _check(second, golden['sd1_empty_context'], 'cached context')

  # New weights (another mtime) -> another key -> recomputed.
  weights = sd_dir / 'text_encoder' / 'model.safetensors'
  stat = weights.stat()
  os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  with pytest.raises(AssertionError, match='recomputed'):
    sd_context.empty_prompt_context(sd_dir)


def test_corrupt_cache_file_is_recomputed(tmp_path, monkeypatch):
  monkeypatch.setenv(sd_context.CACHE_DIR_ENV, str(tmp_path / 'cache'))
  sd_dir = _copy_sd_dir(tmp_path)
  path = sd_context.cache_dir() / f'{sd_context.cache_key(sd_dir)}.npy'
  path.parent.mkdir(parents=True)
  path.write_bytes(b'not a npy file')
  context = sd_context.empty_prompt_context(sd_dir)
  assert context.shape == (77, 32)
  np.testing.assert_array_equal(np.load(path), context)


@pytest.mark.parametrize('missing', ['text_encoder', 'tokenizer'])
def test_missing_subfolder_is_a_clear_error(tmp_path, missing):
  sd_dir = _copy_sd_dir(tmp_path)
  shutil.rmtree(sd_dir / missing)
  for call in (lambda: sd_context.empty_prompt_context(sd_dir),
               lambda: sd_context.encode_prompts(sd_dir, ['a cat'])):
    with pytest.raises(FileNotFoundError) as error:
      call()
    message = str(error.value)
    assert f"{sd_dir / missing}: not found" in message, message
    assert 'model.safetensors of a transformers CLIPTextModel' in message
    assert 'vocab.json and merges.txt' in message


def test_missing_weights_is_a_clear_error(tmp_path):
  sd_dir = _copy_sd_dir(tmp_path)
  weights = sd_dir / 'text_encoder' / 'model.safetensors'
  weights.rename(weights.with_name('pytorch_model.bin'))
  with pytest.raises(FileNotFoundError, match='never loaded'):
    sd_context.encode_prompts(sd_dir, ['a cat'])


def test_fp16_variant(tmp_path, text_towers):
  sd_dir = _copy_sd_dir(tmp_path)
  encoder_dir = sd_dir / 'text_encoder'
  tensors = load_file(str(encoder_dir / 'model.safetensors'))
  (encoder_dir / 'model.safetensors').unlink()
  save_file(tensors, str(encoder_dir / 'model.fp16.safetensors'))
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    clip_text_convert.load_clip_text(encoder_dir)
  _, params = clip_text_convert.load_clip_text(encoder_dir, variant='fp16')
  jax.tree.map(np.testing.assert_array_equal, params, text_towers['sd1'][1])
