"""Losses on the predicted prompt embedding."""

import jax.numpy as jnp
import ml_collections
import optax


def cosine_similarity(a_BxD, b_BxD, eps: float = 1e-8):
  """Row-wise cosine similarity, in float32."""
  a = a_BxD.astype(jnp.float32)
  b = b_BxD.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return dot / jnp.maximum(norms, eps)


def embedding_losses(pred_BxD, target_BxD, loss_config: ml_collections.ConfigDict):
  """Per-example cosine-embedding and Huber terms and their weighted sum.

  The cosine-embedding term is 1 - cos(pred, target) (torch's
  CosineEmbeddingLoss with target +1); the Huber term is averaged over the
  embedding dimensions.

  Returns:
    dict of [B] arrays: 'loss', 'cosine_loss', 'huber_loss', 'cosine'.
  """
  cosine = cosine_similarity(pred_BxD, target_BxD)
  cosine_loss = 1.0 - cosine
  huber = optax.huber_loss(pred_BxD.astype(jnp.float32),
                           target_BxD.astype(jnp.float32),
                           delta=loss_config.huber_delta).mean(axis=-1)
  loss = (loss_config.cosine_weight * cosine_loss +
          loss_config.huber_weight * huber)
  return {'loss': loss, 'cosine_loss': cosine_loss, 'huber_loss': huber,
          'cosine': cosine}


def vocab_bce(word_logits_BxV, labels_BxV):
  """Per-example binary cross-entropy of the vocabulary head, mean over V."""
  return optax.sigmoid_binary_cross_entropy(
      word_logits_BxV.astype(jnp.float32),
      labels_BxV.astype(jnp.float32)).mean(axis=-1)
