"""The trainable bridge from vision features to the decoder's input space.

The paper's projector is dropout 0.1 then one linear layer; LLaVA-1.5's is a two-layer MLP
with GELU. An optional pre-norm (LayerNorm over vision features) and optional learned boundary
tokens (one before, one after the image segment; the paper's future work) complete it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cpeft_jax import configlib

KINDS = ('linear', 'mlp')


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  kind: str = 'linear'
  dropout: float = 0.1  # on the vision features, before the projection
  pre_norm: bool = False
  mlp_hidden: int | None = None  # None: the decoder's width
  boundary_tokens: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'connector.kind={self.kind!r}; expected one of {KINDS}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'connector.dropout must be in [0, 1), got {self.dropout}.')
    if self.mlp_hidden is not None and self.mlp_hidden < 1:
      raise ValueError(f'connector.mlp_hidden must be >= 1, got {self.mlp_hidden}.')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ConnectorConfig:
    return configlib.config_from_dict(cls, d, 'connector')


class Connector(nn.Module):
  """Vision features [B, N, Dv] -> decoder embeddings [B, N, D]; `boundary()` gives [2, D]."""
  cfg: ConnectorConfig
  features: int
  dtype: Any = jnp.float32
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    if cfg.pre_norm:
      self.pre_norm = nn.LayerNorm(dtype=self.dtype)
    self.drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    if cfg.kind == 'linear':
      self.proj = nn.Dense(self.features, dtype=self.dtype)
    else:
      self.fc1 = nn.Dense(cfg.mlp_hidden or self.features, dtype=self.dtype)
      self.fc2 = nn.Dense(self.features, dtype=self.dtype)
    if cfg.boundary_tokens:
      self.boundary_BD = self.param('boundary', nn.initializers.normal(0.02), (2, self.features))

  def __call__(self, feats_BNV):
    x = self.pre_norm(feats_BNV) if self.cfg.pre_norm else feats_BNV
    x = self.drop(x)
    if self.cfg.kind == 'linear':
      return self.proj(x)
    return self.fc2(nn.gelu(self.fc1(x), approximate=False))

  def boundary(self):
    """The learned (open, close) boundary embeddings [2, D]."""
    return self.boundary_BD
