"""clu metric collections for training and evaluation."""

from clu import metrics
import flax


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  cosine_loss: metrics.Average.from_output('cosine_loss')
  huber_loss: metrics.Average.from_output('huber_loss')
  vocab_bce: metrics.Average.from_output('vocab_bce')
  cosine: metrics.Average.from_output('cosine')
  learning_rate: metrics.LastValue.from_output('learning_rate')
  grad_norm: metrics.Average.from_output('grad_norm')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  cosine: metrics.Average.from_output('cosine')
