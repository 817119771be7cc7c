r"""The referee's accuracy on a loop generator's images as the sampler varies.

  python benchmarks/loop_guidance.py --workdir=/tmp/loop_main \
      [--num_prompts=128] [--scales=1,3,5,7.5] [--etas=0] [--num_steps=20] \
      [--output=benchmarks/results/loop_guidance.json]

Samples the first `num_prompts` held-out (test) prompts of a loop workdir
whose generator and referee have trained (`python -m reverse_sd.loop`; the
config is the one its stages recorded), with the same per-prompt seeds for
every guidance scale and DDIM eta (0: deterministic, 1: ancestral) and the
given DDIM step count (default: the config's), and prints the referee's
per-attribute accuracy for each.
"""

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
from reverse_sd.loop import generator as generator_lib
from reverse_sd.loop import referee as referee_lib
from reverse_sd.loop import stages


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num_prompts', type=int, default=128)
  parser.add_argument('--scales', default='1,3,5,7.5')
  parser.add_argument('--etas', default='0')
  parser.add_argument('--num_steps', type=int, default=0,
                      help="DDIM steps (0: the config's)")
  parser.add_argument('--output',
                      default='benchmarks/results/loop_guidance.json')
  args = parser.parse_args()
  scales = [float(s) for s in args.scales.split(',')]
  etas = [float(s) for s in args.etas.split(',')]
  loop = stages.Loop(stages.recorded_config(args.workdir), args.workdir)
  num_steps = args.num_steps or loop.config.sampler.num_steps
  test = loop.split('corpus', 'test')
  n = min(args.num_prompts, len(test['prompts']))
  labels = referee_lib.labels_from_attributes(test['attributes'][:n])
  seeds = generator_lib.example_seeds(loop.config.seed, 'test', np.arange(n))
  contexts = loop.contexts(test['prompts'][:n])
  rows, results = [], []
  for eta in etas:
    for scale in scales:
      images = loop.generator.sample(contexts, seeds, num_steps=num_steps,
                                     guidance_scale=scale, eta=eta)
      accuracy = referee_lib.accuracy(loop.referee.predict(images), labels)
      results.append({'guidance_scale': scale, 'eta': eta,
                      'accuracy': accuracy})
      rows.append([scale, eta, *(accuracy[g] for g in referee_lib.GROUPS)])
  print(f'{num_steps} DDIM steps, {n} prompts')
  print(common.format_table(['guidance', 'eta', *referee_lib.GROUPS], rows))
  common.write_json(args.output, {
      'workdir': args.workdir, 'num_prompts': n,
      'num_steps': num_steps, 'results': results,
      'machine': common.machine(), 'git': common.git_revision(),
      'date': common.now()})


if __name__ == '__main__':
  main()
