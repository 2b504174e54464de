"""A frozen random patch encoder: the offline demo's stand-in for a pre-trained vision model.

Non-overlapping p x p patches and one fixed random linear map to `width`: the demo needs no
download, and a random projection of raw patches keeps the colour, shape and position
information its scenes ask about (position is the patch's place in the sequence).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class PatchEncoderConfig:
  image_size: int = 64
  patch_size: int = 8
  width: int = 128

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size={self.image_size} is not a multiple of '
                       f'patch_size={self.patch_size}.')

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2


class PatchEncoder(nn.Module):
  """pixels [B, H, W, C] -> [B, (H/p)*(W/p), width], patches in row-major order."""
  cfg: PatchEncoderConfig

  @nn.compact
  def __call__(self, pixels_BHWC):
    B, H, W, C = pixels_BHWC.shape
    p, S = self.cfg.patch_size, self.cfg.image_size
    if (H, W) != (S, S):
      raise ValueError(f'PatchEncoder expects {S}x{S} images, got {H}x{W}.')
    x = pixels_BHWC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(B, (H // p) * (W // p), p * p * C)
    return nn.Dense(self.cfg.width, name='proj')(x)
