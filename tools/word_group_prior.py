r"""Per word group, the recall of the word-frequency prior (no model).

What a vocabulary head that sees nothing scores on the synthetic test split
when it ranks each group's words by their share of the training prompts:

  PYTHONPATH=. .venv/bin/python tools/word_group_prior.py \
      runs/ablation_synthetic/vocab_seed0/vocab.json [TARGETS_DIR]

TARGETS_DIR defaults to the default synthetic data set's embedding cache.
"""

import sys

import numpy as np

from reverse_sd import vocab_metrics
from reverse_sd.data import datasets
from reverse_sd.data import synthetic_grammar
from reverse_sd.text import vocab as vocab_lib

_DEFAULT = ('synthetic_prompts/seed0_64px_20000-1000-2000-2000/1.0.0/'
            'reverse_sd_targets/all-MiniLM-L6-v2')


def main(argv):
  vocab = vocab_lib.Vocabulary.load(argv[1])
  root = (argv[2] if len(argv) > 2
          else str(datasets.default_data_dir() / _DEFAULT))
  train = np.load(f'{root}/train.npz')['prompts'].tolist()
  test = np.load(f'{root}/test.npz')['prompts'].tolist()
  train_labels, test_labels = vocab.multi_hot(train), vocab.multi_hot(test)
  groups = {g: [vocab.index[w] for w in words if w in vocab.index]
            for g, words in synthetic_grammar.word_groups().items()}
  prior = np.broadcast_to(train_labels.mean(axis=0), test_labels.shape)
  for group, scores in vocab_metrics.group_recall(prior, test_labels,
                                                  groups).items():
    print(f'{group}: prior_recall {scores["recall"]:.3f} '
          f'(chance {scores["chance"]:.3f})')


if __name__ == '__main__':
  main(sys.argv)
