"""CLIP text transformer (Stable Diffusion's text encoder) in Flax linen.

The same computation as Hugging Face's `CLIPTextModel`: token + learned
position embeddings, pre-LN transformer blocks with a causal mask (the vision
tower's `vit.EncoderLayer`, so the q/k/v/out, `layer_norm1/2` and `fc1/fc2`
names map one to one), then `final_layer_norm`. Returns the
`last_hidden_state` [B, T, D] and the pooled end-of-text feature [B, D].

What Stable Diffusion feeds the U-Net: diffusers'
`StableDiffusionPipeline.encode_prompt` (clip_skip None) tokenizes with
padding='max_length' to 77 tokens and takes `text_encoder(ids)[0]`, the
`last_hidden_state` INCLUDING `final_layer_norm`, with no attention mask (only
the causal one; padding tokens are attended to like any other token), for
the prompt and for the unconditional ('' or negative) prompt alike. SD 2.x's
"penultimate layer" of OpenCLIP ViT-H needs no special case: its
text_encoder/ is stored as a CLIPTextModel with 23 of OpenCLIP's 24 blocks,
so its `last_hidden_state` (after `final_layer_norm`) already is the
penultimate-layer output that SD 2.x was trained on.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from reverse_sd.models import vit
from reverse_sd.ops import attention as attention_ops

# transformers' legacy `eos_token_id` (configs written before transformers
# PR #24773, e.g. SD 1.x's openai/clip-vit-large-patch14 and SD 2.x's
# text_encoder/config.json). With it, the pooled feature is taken at the
# highest token id (CLIP's <|endoftext|> is the last id of the vocabulary).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """Shape of a CLIP text transformer.

  The block fields share their names with `vit.ViTConfig` so that
  `vit.EncoderLayer` takes this config as it is.

  Attributes:
    vocab_size: rows of the token embedding.
    width: model width D (Hugging Face `hidden_size`); for Stable Diffusion it
      equals the U-Net's `cross_attention_dim`.
    layers: number of transformer blocks.
    heads: attention heads per block.
    mlp_dim: hidden size of the MLP (Hugging Face `intermediate_size`).
    max_positions: rows of the position embedding (Hugging Face
      `max_position_embeddings`; 77 for every SD text encoder).
    activation: 'quick_gelu' (OpenAI CLIP, SD 1.x) or 'gelu' (OpenCLIP, SD
      2.x).
    layer_norm_eps: epsilon of every LayerNorm.
    bos_token_id, eos_token_id, pad_token_id: as in config.json; only
      `eos_token_id` changes the computation (the pooled feature).
  """
  vocab_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  max_positions: int = 77
  activation: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f'width {self.width} is not divisible by heads '
                       f'{self.heads}')
    if self.activation not in ('quick_gelu', 'gelu'):
      raise ValueError(f"activation {self.activation!r} is not supported "
                       "('quick_gelu' or 'gelu')")


VARIANTS = {
    # SD 1.x text_encoder/: openai/clip-vit-large-patch14's text tower.
    'sd1': ClipTextConfig(vocab_size=49408, width=768, layers=12, heads=12,
                          mlp_dim=3072, eos_token_id=LEGACY_EOS_TOKEN_ID,
                          bos_token_id=0),
    # SD 2.x text_encoder/: OpenCLIP ViT-H/14's text tower less its last
    # block (23 of 24).
    'sd2': ClipTextConfig(vocab_size=49408, width=1024, layers=23, heads=16,
                          mlp_dim=4096, activation='gelu',
                          eos_token_id=LEGACY_EOS_TOKEN_ID, bos_token_id=0),
}

# Tensor-parallel rules on the 'model' mesh axis
# (config.mesh.param_preset='tensor_parallel'): the blocks are
# `vit.EncoderLayer`s, so the vision tower's rules cover them; the token
# embedding, the largest array (49408 x D), splits its vocabulary rows
# (49408 = 2**8 * 193: any power-of-two axis up to 256).
PARTITION_RULES = (
    (r'token_embedding/embedding$', ('model', None)),
    *vit.PARTITION_RULES,
)


class ClipTextOutput(NamedTuple):
  """What `ClipTextTransformer` returns.

  Attributes:
    last_hidden_state: [B, T, D] after `final_layer_norm`: the Stable
      Diffusion context (`encoder_hidden_states` of the U-Net).
    pooled: [B, D], `last_hidden_state` at the end-of-text token (Hugging
      Face `pooler_output`, before any text projection).
  """
  last_hidden_state: jax.Array
  pooled: jax.Array


def eos_positions(input_ids_BxT: jax.Array, eos_token_id: int) -> jax.Array:
  """Index of the end-of-text token per sequence, as transformers finds it.

  With the legacy `eos_token_id` 2: the position of the highest id. Otherwise
  the first position holding `eos_token_id` (0 if there is none, as
  transformers' argmax gives).
  """
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids_BxT, axis=-1)
  return jnp.argmax(input_ids_BxT == eos_token_id, axis=-1)


class ClipTextTransformer(nn.Module):
  """CLIP text tower: token ids [B, T] -> `ClipTextOutput`.

  T may be at most `config.max_positions`; Stable Diffusion always uses the
  tokenizer's 77 (padded) tokens.

  Attributes:
    config: the tower's shape.
    dtype: computation dtype (params stay float32).
    attention: the attention op (reverse_sd/ops/attention.py).
  """
  config: ClipTextConfig
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, input_ids_BxT) -> ClipTextOutput:
    cfg = self.config
    length = input_ids_BxT.shape[-1]
    if length > cfg.max_positions:
      raise ValueError(f'{length} tokens, but the text transformer has only '
                       f'{cfg.max_positions} position embeddings')
    x_BxTxD = nn.Embed(cfg.vocab_size, cfg.width,
                       embedding_init=nn.initializers.normal(0.02),
                       dtype=self.dtype,
                       name='token_embedding')(input_ids_BxT)
    positions_PxD = self.param('position_embedding',
                               nn.initializers.normal(0.02),
                               (cfg.max_positions, cfg.width))
    x_BxTxD = x_BxTxD + positions_PxD[:length].astype(x_BxTxD.dtype)
    for i in range(cfg.layers):
      x_BxTxD = vit.EncoderLayer(cfg, self.dtype, self.attention,
                                 name=f'layers_{i}')(x_BxTxD, causal=True)
    x_BxTxD = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                           name='final_layer_norm')(x_BxTxD)
    eos_B = eos_positions(input_ids_BxT, cfg.eos_token_id)
    pooled_BxD = jnp.take_along_axis(x_BxTxD, eos_B[:, None, None],
                                     axis=1)[:, 0]
    return ClipTextOutput(x_BxTxD, pooled_BxD)
