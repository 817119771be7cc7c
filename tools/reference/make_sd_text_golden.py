"""Writes tiny SD text encoders + CLIP tokenizers and their outputs for tests.

Runs in the reference environment only (torch, transformers, diffusers; see
setup_env.sh), never in the project's .venv, and after make_sd_golden.py
(the pipeline built here uses its tiny U-Nets and VAE):

  bash tools/reference/setup_env.sh
  HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/reference/make_sd_text_golden.py

Nothing is downloaded. The vocabulary is CLIP's layout in miniature: the 256
byte-level characters, the same 256 with the end-of-word suffix `</w>`, a few
BPE merges learned here from the prompts in CORPUS, then `<|startoftext|>`
and `<|endoftext|>` last (so, as in the real vocabulary, '!' is id 0 and the
end-of-text token has the highest id). The text encoders are random
CLIPTextModels (fixed seeds) with extra noise on every parameter, rounded to
float16 and stored in float16 (to keep the fixtures small); every recorded
output is computed in float32 from exactly those float16 values.

Written, each folder in one of the layouts a diffusers SD folder really has:

  tests/golden/tiny_sd/text_encoder/   CLIPTextModel as transformers 5
      `save_pretrained` writes it (bare keys `embeddings.*`, `encoder.*`,
      `final_layer_norm.*`): hidden 32 (= tiny_sd/unet cross_attention_dim),
      2 layers, 2 heads, MLP 64, quick_gelu, 77 positions, eos_token_id = the
      id of <|endoftext|> (pooled feature = first EOS position).
  tests/golden/tiny_sd/tokenizer/      the Hub layout of SD 1.x
      (vocab.json, merges.txt with its '#version' header,
      special_tokens_map.json, tokenizer_config.json; pad <|endoftext|>).
  tests/golden/tiny_sd2/text_encoder/  the transformers 4 layout of the Hub's
      SD 2.x (`text_model.*` keys plus the int64 `position_ids` buffer),
      hidden 48 (= tiny_sd2/unet cross_attention_dim), 2 layers, 3 heads,
      MLP 96, gelu, and SD 2.1's legacy bos/eos/pad ids 0/2/1 (pooled
      feature = argmax of the ids). Reloaded with from_pretrained to check
      transformers 5 reads this layout.
  tests/golden/tiny_sd2/tokenizer/     CLIPTokenizer as transformers 5
      `save_pretrained` writes it (tokenizer.json, tokenizer_config.json),
      pad token '!'.
  tests/golden/sd_text_golden.npz:
    prompts             str [P]
    {sd1,sd2}_input_ids  int64 [P, 77]: CLIPTokenizer.from_pretrained(
        <tokenizer dir>)(prompts, padding='max_length', max_length=77,
        truncation=True), as StableDiffusionPipeline.encode_prompt calls it
    hidden_prompts      int [H]: indices of the prompts with hidden states
    {sd1,sd2}_last_hidden_state  float32 [H, 77, D]: CLIPTextModel(ids)[0]
    {sd1,sd2}_pooled    float32 [H, D]: its pooler_output
    {sd1,sd2}_empty_context  float32 [77, D]: the negative_prompt_embeds of
        StableDiffusionPipeline.encode_prompt('', 'cpu', 1, True) (no
        negative prompt, clip_skip None), run on a real pipeline assembled
        from the tiny U-Net, VAE, text encoder and tokenizer
    sd2_untruncated_length  int: token count of the long prompt untruncated
    versions_json       str, versions of the packages that produced it
"""

import argparse
import collections
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil

os.environ.setdefault('HF_HUB_OFFLINE', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import diffusers
import numpy as np
import safetensors.torch
import torch
import transformers

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_DEFAULT_OUT = _REPO_ROOT / 'tests' / 'golden'

BOS, EOS = '<|startoftext|>', '<|endoftext|>'
MAX_LENGTH = 77
NUM_MERGES = 120
NOISE = 0.05

# Text the tiny BPE merges are learned from.
CORPUS = (
    'a photo of an astronaut riding a horse on mars',
    'a painting of a cat, trending on artstation, highly detailed',
    'portrait of a woman, digital art, concept art, sharp focus',
    'a beautiful landscape with mountains and a lake at sunset',
    'an oil painting of a castle in the style of a fantasy artist',
    'cinematic photo of a dog in the city at night, 4k, 8k, uhd',
)

# Prompts whose ids are recorded: empty, plain, case/punctuation (and '!',
# which is the pad token of SD 2), contractions/whitespace/digits, non-ASCII
# (NFC composition, bytes with no merges), special tokens typed in the text
# (matched before or after normalisation depending on the token's
# `normalized` flag), a prompt longer than 77 tokens (truncation), weights
# syntax.
LONG_PROMPT = ', '.join(['a highly detailed painting of a castle'] * 12)
PROMPTS = (
    '',
    'a photo of an astronaut riding a horse on mars',
    'A Painting of a CAT, trending on ArtStation!!',
    "it's a dog's    life\n\tin 4k, 8K UHD 2024",
    'caf\u00e9 \u2603 na\u00efve \u00c9t\u00e9',
    'cafe\u0301 portrait <|endoftext|> of a woman <|startoftext|>',
    LONG_PROMPT,
    '(masterpiece:1.2), [best quality], {lake} #sunset @art ~ 100%',
    'hello! wow!!! ?!',
    '   leading and trailing spaces   ',
    'x <|StartOfText|> y <|EndOfText|> z',
)
# Prompts whose hidden states are recorded (all ids are): keeps the fixture
# small.
HIDDEN_PROMPTS = (0, 1, 2, 4, 5, 6)

TEXT_SD1 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                hidden_act='quick_gelu', layer_norm_eps=1e-5)
TEXT_SD2 = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=3, max_position_embeddings=MAX_LENGTH,
                hidden_act='gelu', layer_norm_eps=1e-5,
                # SD 2.1's text_encoder/config.json keeps these legacy ids.
                bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _versions() -> dict[str, str]:
  names = ('torch', 'transformers', 'diffusers', 'tokenizers', 'safetensors',
           'numpy')
  versions = {name: importlib.metadata.version(name) for name in names}
  versions['python'] = platform.python_version()
  return versions


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP's byte -> printable character table."""
  byte_values = (list(range(ord('!'), ord('~') + 1)) +
                 list(range(ord('\xa1'), ord('\xac') + 1)) +
                 list(range(ord('\xae'), ord('\xff') + 1)))
  chars = byte_values[:]
  extra = 0
  for byte in range(256):
    if byte not in byte_values:
      byte_values.append(byte)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(byte_values, (chr(c) for c in chars)))


def learn_merges(words: collections.Counter, num_merges: int
                 ) -> list[tuple[str, str]]:
  """Plain BPE: repeatedly merges the most frequent adjacent pair.

  `words` maps a tuple of symbols (the last one with '</w>') to its count;
  ties go to the lexicographically smallest pair, so the result is fixed.
  """
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for symbols, count in words.items():
      for pair in zip(symbols, symbols[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = min(pairs, key=lambda pair: (-pairs[pair], pair))
    merges.append(best)
    merged = collections.Counter()
    for symbols, count in words.items():
      out, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          out.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
  """CLIP-layout vocabulary and merges learned from CORPUS."""
  byte_chars = list(bytes_to_unicode().values())
  splitter = transformers.CLIPTokenizer(
      vocab={c: i for i, c in enumerate(byte_chars + [BOS, EOS])}, merges=[])
  backend = splitter.backend_tokenizer
  words = collections.Counter()
  for text in CORPUS:
    normalized = backend.normalizer.normalize_str(text)
    for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
      words[tuple(word[:-1]) + (word[-1] + '</w>',)] += 1
  merges = learn_merges(words, NUM_MERGES)
  tokens = (byte_chars + [c + '</w>' for c in byte_chars] +
            [a + b for a, b in merges] + [BOS, EOS])
  assert len(set(tokens)) == len(tokens), 'duplicate token in the vocabulary'
  return {token: i for i, token in enumerate(tokens)}, merges


def _added_token(content: str) -> dict:
  return dict(content=content, lstrip=False, normalized=True, rstrip=False,
              single_word=False)


def write_hub_tokenizer(out_dir: pathlib.Path, vocab, merges,
                        pad_token: str) -> None:
  """The tokenizer/ folder as the Hub's SD 1.x / 2.x repositories have it."""
  out_dir.mkdir(parents=True)
  (out_dir / 'vocab.json').write_text(json.dumps(vocab, ensure_ascii=False))
  (out_dir / 'merges.txt').write_text(
      '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  special = dict(bos_token=_added_token(BOS), eos_token=_added_token(EOS),
                 pad_token=pad_token, unk_token=_added_token(EOS))
  (out_dir / 'special_tokens_map.json').write_text(json.dumps(special,
                                                              indent=2))
  config = dict(
      add_prefix_space=False, do_lower_case=True, errors='replace',
      model_max_length=MAX_LENGTH, tokenizer_class='CLIPTokenizer',
      **{key: ({'__type': 'AddedToken', **value} if isinstance(value, dict)
               else value) for key, value in special.items()})
  (out_dir / 'tokenizer_config.json').write_text(json.dumps(config, indent=2))


def _noisy_fp16_text_encoder(text_config: dict, vocab_size: int,
                             seed: int) -> transformers.CLIPTextModel:
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(vocab_size=vocab_size, **text_config)
  model = transformers.CLIPTextModel(config).eval()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for _, param in sorted(model.named_parameters()):
      param.add_(NOISE * torch.randn(param.shape, generator=generator))
      param.copy_(param.half().float())
  return model


def _size_kib(folder: pathlib.Path) -> float:
  return sum(p.stat().st_size for p in folder.iterdir()) / 1024


def _to_transformers4_layout(model_dir: pathlib.Path) -> None:
  """Rewrites model.safetensors with the `text_model.` prefix and the
  persistent `position_ids` buffer of transformers 4 (the Hub's SD files)."""
  path = model_dir / 'model.safetensors'
  tensors = safetensors.torch.load_file(str(path))
  renamed = {f'text_model.{key}': value for key, value in tensors.items()}
  renamed['text_model.embeddings.position_ids'] = torch.arange(
      MAX_LENGTH, dtype=torch.int64)[None]
  safetensors.torch.save_file(renamed, str(path), metadata={'format': 'pt'})


def _pipeline(sd_dir: pathlib.Path, vae_dir: pathlib.Path, text_encoder,
              tokenizer) -> diffusers.StableDiffusionPipeline:
  unet = diffusers.UNet2DConditionModel.from_pretrained(
      str(sd_dir / 'unet'), torch_dtype=torch.float32)
  vae = diffusers.AutoencoderKL.from_pretrained(str(vae_dir),
                                                torch_dtype=torch.float32)
  return diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
      scheduler=diffusers.PNDMScheduler(), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)


def make_one(name: str, sd_dir: pathlib.Path, vae_dir: pathlib.Path,
             text_config: dict, pad_token: str, vocab, merges, *,
             hub_tokenizer: bool, transformers4_weights: bool,
             seed: int) -> dict[str, np.ndarray]:
  """Writes <sd_dir>/{text_encoder,tokenizer} and returns the golden arrays."""
  text_dir, tokenizer_dir = sd_dir / 'text_encoder', sd_dir / 'tokenizer'
  for folder in (text_dir, tokenizer_dir):
    if folder.exists():
      shutil.rmtree(folder)
  if hub_tokenizer:
    write_hub_tokenizer(tokenizer_dir, vocab, merges, pad_token)
  else:
    transformers.CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=pad_token,
        model_max_length=MAX_LENGTH).save_pretrained(str(tokenizer_dir))
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
  assert tokenizer.pad_token == pad_token, tokenizer.pad_token

  config = dict(text_config)
  if 'eos_token_id' not in config:
    config.update(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                  pad_token_id=tokenizer.pad_token_id)
  model = _noisy_fp16_text_encoder(config, len(vocab), seed)
  model.half().save_pretrained(str(text_dir), safe_serialization=True)
  model.float()
  if transformers4_weights:
    _to_transformers4_layout(text_dir)
  reloaded = transformers.CLIPTextModel.from_pretrained(
      str(text_dir), dtype=torch.float32).eval()
  for (key, expected), (_, actual) in zip(model.state_dict().items(),
                                          reloaded.state_dict().items()):
    assert torch.equal(expected, actual), f'{key} changed on reload'

  golden = {}
  ids = tokenizer(list(PROMPTS), padding='max_length', max_length=MAX_LENGTH,
                  truncation=True, return_tensors='pt').input_ids
  golden[f'{name}_input_ids'] = ids.numpy()
  hidden = list(HIDDEN_PROMPTS)
  with torch.no_grad():
    out = reloaded(ids[hidden])
  golden[f'{name}_last_hidden_state'] = out.last_hidden_state.numpy()
  golden[f'{name}_pooled'] = out.pooler_output.numpy()
  golden[f'{name}_untruncated_length'] = np.array(
      len(tokenizer(LONG_PROMPT).input_ids))

  pipe = _pipeline(sd_dir, vae_dir, reloaded, tokenizer)
  with torch.no_grad():
    cond, uncond = pipe.encode_prompt('', torch.device('cpu'), 1, True)
    cond_text, _ = pipe.encode_prompt(PROMPTS[1], torch.device('cpu'), 1,
                                      True)
  assert torch.equal(cond, uncond)
  assert torch.equal(uncond[0], out.last_hidden_state[0]), (
      'encode_prompt("") is not the text encoder output of ""')
  assert torch.equal(cond_text[0], out.last_hidden_state[1])
  golden[f'{name}_empty_context'] = uncond[0].numpy()
  print(f'{name}: wrote {text_dir} ({_size_kib(text_dir):.1f} KiB), '
        f'{tokenizer_dir} ({_size_kib(tokenizer_dir):.1f} KiB): '
        f'{sorted(os.listdir(tokenizer_dir))}')
  return golden


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=_DEFAULT_OUT)
  args = parser.parse_args()
  vocab, merges = build_vocab()
  print(f'vocabulary: {len(vocab)} tokens, {len(merges)} merges')
  golden = {'prompts': np.array(PROMPTS),
            'hidden_prompts': np.array(HIDDEN_PROMPTS)}
  vae_dir = args.out / 'tiny_sd' / 'vae'
  golden.update(make_one(
      'sd1', args.out / 'tiny_sd', vae_dir, TEXT_SD1, EOS, vocab, merges,
      hub_tokenizer=True, transformers4_weights=False, seed=10))
  golden.update(make_one(
      'sd2', args.out / 'tiny_sd2', vae_dir, TEXT_SD2, '!', vocab, merges,
      hub_tokenizer=False, transformers4_weights=True, seed=20))
  versions = _versions()
  golden['versions_json'] = np.array(json.dumps(versions, sort_keys=True))
  path = args.out / 'sd_text_golden.npz'
  np.savez_compressed(path, **golden)
  print(f'Wrote {path} ({path.stat().st_size / 1024:.1f} KiB): '
        f'{sorted(golden)}')
  for name in ('sd1', 'sd2'):
    for i in range(len(PROMPTS)):
      ids = golden[f'{name}_input_ids'][i]
      print(name, repr(PROMPTS[i][:40]), ids[:ids.argmax() + 2].tolist())
  print(json.dumps(versions, sort_keys=True))


if __name__ == '__main__':
  main()
