r"""Where a loop generator's shapes fail: by object size and by shape.

  python benchmarks/loop_shape.py --workdir=/tmp/loop \
      [--num_prompts=1000] [--referee_workdir=DIR] \
      [--output=benchmarks/results/loop_shape.json]

Reads a loop workdir whose autoencoder, generator and referee have trained
(`python -m reverse_sd.loop`; the config is the one its stages recorded),
samples the first `num_prompts` held-out (test) prompts with the config's
sampler and the quality stage's seeds, and prints the referee's shape
accuracy on the rendered images, their autoencoder round trip and the
generated images: overall, by the object's size and by its shape, and the
referee's accuracy on every attribute. `--referee_workdir` scores with
another trained referee (a folder `referee.train` wrote) instead of the
workdir's own.
"""

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
from reverse_sd.data import synthetic_grammar as grammar
from reverse_sd.loop import generator as generator_lib
from reverse_sd.loop import referee as referee_lib
from reverse_sd.loop import stages

KINDS = ('rendered', 'autoencoded', 'generated')


def shape_breakdown(predicted_shape_N: np.ndarray, labels) -> dict:
  """Shape accuracy overall, by size and by shape (single-object scenes)."""
  shape_N = labels['object1/shape']
  size_N = labels['object1/size']
  hit_N = predicted_shape_N == shape_N
  return {
      'all': float(hit_N.mean()),
      'by_size': {name: float(hit_N[size_N == i].mean())
                  for i, name in enumerate(grammar.SIZES)
                  if np.any(size_N == i)},
      'by_shape': {name: float(hit_N[shape_N == i].mean())
                   for i, name in enumerate(grammar.SHAPES)
                   if np.any(shape_N == i)},
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num_prompts', type=int, default=1000)
  parser.add_argument('--referee_workdir', default='')
  parser.add_argument('--output', default='benchmarks/results/loop_shape.json')
  args = parser.parse_args()
  loop = stages.Loop(stages.recorded_config(args.workdir), args.workdir)
  if loop.config.corpus.max_objects != 1:
    sys.exit('loop_shape.py reads single-object corpora (corpus.max_objects '
             f'= 1), got {loop.config.corpus.max_objects}.')
  referee = (referee_lib.Referee.load(args.referee_workdir)
             if args.referee_workdir else loop.referee)
  test = loop.split('corpus', 'test')
  n = min(args.num_prompts, len(test['prompts']))
  labels = referee_lib.labels_from_attributes(test['attributes'][:n])
  images = {'rendered': test['images'][:n]}
  images['autoencoded'] = loop.round_trip(images['rendered'])
  images['generated'] = loop.sample(
      test['prompts'][:n],
      generator_lib.example_seeds(loop.config.seed, 'test', np.arange(n)))
  results = {}
  for kind in KINDS:
    predicted = referee.predict(images[kind])
    results[kind] = {
        'accuracy': referee_lib.accuracy(predicted, labels),
        'shape': shape_breakdown(predicted['object1/shape'], labels)}
  print(f'Shape accuracy on {n} held-out prompts, by size and by shape:')
  columns = (['all', *grammar.SIZES],
             list(results['rendered']['shape']['by_shape']))
  print(common.format_table(
      ['images', *columns[0]],
      [[kind, results[kind]['shape']['all'],
        *(results[kind]['shape']['by_size'].get(s, float('nan'))
          for s in grammar.SIZES)] for kind in KINDS]))
  print(common.format_table(
      ['images', *columns[1]],
      [[kind, *(results[kind]['shape']['by_shape'][s] for s in columns[1])]
       for kind in KINDS]))
  print('Every attribute:')
  print(common.format_table(
      ['images', *referee_lib.GROUPS],
      [[kind, *(results[kind]['accuracy'][g] for g in referee_lib.GROUPS)]
       for kind in KINDS]))
  common.write_json(args.output, {
      'workdir': args.workdir, 'referee_workdir': args.referee_workdir,
      'num_prompts': n, 'results': results, 'machine': common.machine(),
      'git': common.git_revision(), 'date': common.now()})


if __name__ == '__main__':
  main()
