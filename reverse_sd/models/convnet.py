"""A plain convolutional tower: strided 3x3 convolutions, then a Dense layer
over the flattened feature map.

The CPU default for small synthetic images: no normalisation layers (colour
and brightness reach the head unchanged) and a Dense read-out with its own
weights per position, so where an object is matters as much as what it is.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from reverse_sd.ops import conv as conv_ops


@dataclasses.dataclass(frozen=True)
class ConvNetConfig:
  """Channels of each stride-2 3x3 convolution and the read-out width."""
  channels: tuple[int, ...]
  output_dim: int


VARIANTS = {
    'tiny': ConvNetConfig(channels=(8, 16), output_dim=32),
    'small': ConvNetConfig(channels=(32, 64, 128, 256), output_dim=768),
}


class ConvNet(nn.Module):
  """Images [B,H,W,3] (normalised) -> features [B,output_dim]."""
  config: ConvNetConfig
  dtype: jnp.dtype = jnp.float32
  conv: conv_ops.ConvOp = conv_ops.ConvOp()  # reverse_sd/ops/conv.py.

  @nn.compact
  def __call__(self, images_BxHxWx3):
    x = images_BxHxWx3.astype(self.dtype)
    for i, channels in enumerate(self.config.channels):
      x = conv_ops.Conv(channels, (3, 3), strides=2, padding='SAME',
                        dtype=self.dtype, activation='relu', op=self.conv,
                        name=f'conv{i}')(x)
    x = x.reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(self.config.output_dim, dtype=self.dtype,
                            name='readout')(x))
