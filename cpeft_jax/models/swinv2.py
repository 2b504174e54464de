"""A frozen Swin Transformer V2 image encoder (transformers' Swinv2Model), the paper's encoder.

Patches (a strided convolution, then LayerNorm) pass through stages of blocks that attend within
windows; every other block shifts its windows by half a window (cyclically, with a mask so that
tokens from across the wrap do not see each other). V2's attention is cosine attention with a
learned, clamped logit scale per head, plus a bias per head from a small MLP over log-spaced
relative coordinates (continuous position bias); blocks normalise *after* each residual branch.
Between stages, patch merging halves the grid and doubles the width. microsoft/swinv2-tiny-
patch4-window8-256 turns 256x256 pixels into 64 embeddings of width 768.

`feature_layer` indexes transformers' `hidden_states`, one entry per stage plus the embeddings:
0 is the normalised patch embeddings, k the output of stage k *after* its patch merging (so -2
has the last stage's grid and width), and the last (-1) is `last_hidden_state`, the final stage
after the model's LayerNorm. Only the stages up to the chosen one are built, loaded and run.

Stages differ in width and grid and blocks alternate between two static window layouts, so the
blocks are unrolled rather than scanned (Swin-tiny has 12, Swin-large 24).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import configlib
from cpeft_jax.models.decoder_config import DTYPES
from cpeft_jax.models.vision import (ACTIVATIONS, check_common, check_pixels, hf_value,
                                     resolve_feature_layer, square)

MODEL_TYPES = ('swinv2',)
# transformers' Swinv2Config defaults, for keys a config.json may omit.
DEFAULTS = dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=(2, 2, 6, 2),
                num_heads=(3, 6, 12, 24), window_size=7, pretrained_window_sizes=(0, 0, 0, 0),
                mlp_ratio=4.0, qkv_bias=True, hidden_act='gelu', layer_norm_eps=1e-5,
                use_absolute_embeddings=False)
_TORCH_LN_EPS = 1e-5  # the embedding and patch-merging norms use nn.LayerNorm's default eps
_MASK = -100.0  # transformers' shifted-window mask value (which it adds twice, as here)
_CPB_HIDDEN = 512  # width of the continuous-position-bias MLP


@dataclasses.dataclass(frozen=True)
class SwinV2Config:
  """Shape, numerics and output choice of a Swin V2 encoder (see the module docstring)."""
  image_size: int = 256
  patch_size: int = 4
  num_channels: int = 3
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 8
  pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-5
  feature_layer: int = -1  # index into the len(depths) + 1 hidden states
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    for name in ('image_size', 'patch_size', 'num_channels', 'embed_dim', 'window_size'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f'swinv2.{name} must be a positive integer, got {v!r}.')
    n = len(self.depths)
    if not n or len(self.num_heads) != n or len(self.pretrained_window_sizes) != n:
      raise ValueError(f'swinv2.depths={self.depths}, num_heads={self.num_heads} and '
                       f'pretrained_window_sizes={self.pretrained_window_sizes} must have one '
                       'entry per stage (at least one).')
    if any(d < 1 for d in self.depths):
      raise ValueError(f'swinv2.depths={self.depths} must be positive.')
    for s, h in enumerate(self.num_heads):
      if self.stage_width(s) % h:
        raise ValueError(f'Stage {s} of width {self.stage_width(s)} is not divisible by '
                         f'swinv2.num_heads[{s}]={h}.')
    if self.image_size % self.patch_size:
      raise ValueError(f'swinv2.image_size={self.image_size} is not a multiple of '
                       f'swinv2.patch_size={self.patch_size}.')
    check_common(self, 'swinv2')
    resolve_feature_layer(self.feature_layer, n + 1, 'swinv2')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> SwinV2Config:
    return configlib.config_from_dict(cls, d, 'swinv2')

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def stage_width(self, s: int) -> int:
    return self.embed_dim * 2 ** s

  def stage_grid(self, s: int) -> int:
    """The grid stage s runs on (patch merging pads odd grids, so it rounds up)."""
    g = self.grid
    for _ in range(s):
      g = (g + 1) // 2
    return g

  @property
  def run_stages(self) -> int:
    """How many stages run: the index of `feature_layer` into the hidden states."""
    return resolve_feature_layer(self.feature_layer, self.num_stages + 1, 'swinv2')

  @property
  def out_width(self) -> int:
    return self.stage_width(min(self.run_stages, self.num_stages - 1))

  @property
  def num_tokens(self) -> int:
    return self.stage_grid(min(self.run_stages, self.num_stages - 1)) ** 2


def config_from_hf(hf: Mapping[str, Any], **overrides) -> SwinV2Config:
  """The `SwinV2Config` of a Swinv2 config.json dict; `overrides` set feature_layer, dtype, ..."""
  if hf.get('model_type') not in MODEL_TYPES:
    raise ValueError(f'model_type={hf.get("model_type")!r} is not Swin V2; expected one of '
                     f'{MODEL_TYPES}.')
  get = lambda key: hf_value(hf, key, DEFAULTS)
  if get('use_absolute_embeddings'):
    raise ValueError('config.json has use_absolute_embeddings=true; the Swin V2 encoder '
                     'implements relative (continuous) position bias only.')
  depths = tuple(get('depths'))
  # transformers indexes pretrained_window_sizes by stage, so a longer list (its default has four
  # entries) is fine for fewer stages.
  pretrained = tuple(get('pretrained_window_sizes'))[:len(depths)]
  fields = dict(
      image_size=square(get('image_size'), 'image_size'),
      patch_size=square(get('patch_size'), 'patch_size'), num_channels=get('num_channels'),
      embed_dim=get('embed_dim'), depths=depths, num_heads=tuple(get('num_heads')),
      window_size=get('window_size'), pretrained_window_sizes=pretrained,
      mlp_ratio=float(get('mlp_ratio')), qkv_bias=bool(get('qkv_bias')),
      hidden_act=get('hidden_act'), layer_norm_eps=float(get('layer_norm_eps')))
  fields.update(overrides)
  return SwinV2Config.from_dict(fields)


# ----------------------------------------------------------------------------- static tables


def window_and_shift(cfg: SwinV2Config, stage: int, block: int) -> tuple[int, int]:
  """As transformers: the window shrinks to a grid smaller than it, and then nothing shifts.

  The grid here is the config's `grid // 2**stage`, as transformers computes it.
  """
  res = cfg.grid // 2 ** stage
  window = min(res, cfg.window_size)
  shift = 0 if res <= window or block % 2 == 0 else cfg.window_size // 2
  return window, shift


def relative_coords_table(window: int, pretrained_window: int) -> np.ndarray:
  """[(2w-1)^2, 2] log-spaced relative coordinates, the continuous position bias MLP's input."""
  r = np.arange(-(window - 1), window, dtype=np.float32)
  table = np.stack(np.meshgrid(r, r, indexing='ij'), -1)  # [2w-1, 2w-1, 2]
  if pretrained_window > 0:
    table = table / np.float32(pretrained_window - 1)
  elif window > 1:
    table = table / np.float32(window - 1)
  table = table * np.float32(8)
  table = np.sign(table) * np.log2(np.abs(table) + 1.0) / np.float32(math.log2(8))
  return table.reshape(-1, 2).astype(np.float32)


def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] index into the relative coordinates table, for each (query, key) pair."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[windows, w*w, w*w]: 0 within a shifted region, _MASK across regions (cyclic wrap)."""
  def regions(n):
    i = np.arange(n)
    return (i >= n - window).astype(np.int64) + (i >= n - shift)
  img = regions(height)[:, None] * 3 + regions(width)[None, :]
  win = partition(img[None, :, :, None], window)[..., 0]  # [windows, w*w]
  return np.where(win[:, None, :] != win[:, :, None], _MASK, 0.0).astype(np.float32)


def partition(x_BHWC, window: int):
  """[B, H, W, C] -> [B * windows, window * window, C], windows in row-major order."""
  B, H, W, C = x_BHWC.shape
  x = x_BHWC.reshape(B, H // window, window, W // window, window, C)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def unpartition(x_WNC, window: int, B: int, H: int, W: int):
  """The inverse of `partition`."""
  x = x_WNC.reshape(B, H // window, W // window, window, window, -1)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)


# ----------------------------------------------------------------------------- modules


class WindowAttention(nn.Module):
  """Cosine attention within windows, with a learned logit scale and continuous position bias."""
  cfg: SwinV2Config
  num_heads: int
  window: int
  pretrained_window: int

  @nn.compact
  def __call__(self, x_WNC, mask_VNN):
    cfg = self.cfg
    dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    Wn, N, C = x_WNC.shape
    H = self.num_heads
    dense = lambda features, name, bias=True: nn.Dense(features, use_bias=bias, dtype=dt,
                                                        param_dtype=pdt, name=name)
    q = dense(C, 'query', cfg.qkv_bias)(x_WNC).reshape(Wn, N, H, C // H)
    k = dense(C, 'key', False)(x_WNC).reshape(Wn, N, H, C // H)
    v = dense(C, 'value', cfg.qkv_bias)(x_WNC).reshape(Wn, N, H, C // H)

    # Cosine similarities and the softmax in float32, whatever the compute dtype.
    unit = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    q32, k32 = unit(q.astype(jnp.float32)), unit(k.astype(jnp.float32))
    logits_WHNN = jnp.einsum('wnhk,wmhk->whnm', q32, k32)
    logit_scale_H11 = self.param('logit_scale', nn.initializers.constant(math.log(10.0)),
                                 (H, 1, 1), pdt)
    logits_WHNN = logits_WHNN * jnp.exp(jnp.minimum(logit_scale_H11.astype(jnp.float32),
                                                    math.log(100.0)))

    table = jnp.asarray(relative_coords_table(self.window, self.pretrained_window))
    h = nn.relu(dense(_CPB_HIDDEN, 'cpb_mlp_0')(table.astype(dt)))
    bias_TH = dense(H, 'cpb_mlp_2', False)(h).astype(jnp.float32)
    bias_NNH = bias_TH[relative_position_index(self.window)]
    logits_WHNN = logits_WHNN + 16.0 * jax.nn.sigmoid(bias_NNH.transpose(2, 0, 1))
    if mask_VNN is not None:
      V = mask_VNN.shape[0]
      logits = logits_WHNN.reshape(Wn // V, V, H, N, N) + 2.0 * mask_VNN[None, :, None]
      logits_WHNN = logits.reshape(Wn, H, N, N)
    probs = jax.nn.softmax(logits_WHNN, axis=-1).astype(dt)
    out = jnp.einsum('whnm,wmhk->wnhk', probs, v).reshape(Wn, N, C)
    return dense(C, 'output')(out)


class SwinBlock(nn.Module):
  """One (shifted-)window block with post-norm residuals: x + norm(f(x))."""
  cfg: SwinV2Config
  num_heads: int
  window: int
  shift: int
  pretrained_window: int

  @nn.compact
  def __call__(self, x_BHWC):
    cfg = self.cfg
    dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    B, H, W, C = x_BHWC.shape
    ws, s = self.window, self.shift
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name=name)
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    h = jnp.pad(x_BHWC, ((0, 0), (0, Hp - H), (0, Wp - W), (0, 0)))
    if s:
      h = jnp.roll(h, (-s, -s), axis=(1, 2))
    mask = jnp.asarray(shift_mask(Hp, Wp, ws, s)) if s else None
    h = WindowAttention(cfg, self.num_heads, ws, self.pretrained_window, name='attn')(
        partition(h, ws), mask)
    h = unpartition(h, ws, B, Hp, Wp)
    if s:
      h = jnp.roll(h, (s, s), axis=(1, 2))
    x_BHWC = x_BHWC + norm('layernorm_before')(h[:, :H, :W])
    dense = lambda features, name: nn.Dense(features, dtype=dt, param_dtype=pdt, name=name)
    h = ACTIVATIONS[cfg.hidden_act](dense(int(cfg.mlp_ratio * C), 'intermediate')(x_BHWC))
    return x_BHWC + norm('layernorm_after')(dense(C, 'output')(h))


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated (odd grids padded), then Linear 4C -> 2C and LayerNorm."""
  cfg: SwinV2Config

  @nn.compact
  def __call__(self, x_BHWC):
    cfg = self.cfg
    dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    _, H, W, C = x_BHWC.shape
    x = jnp.pad(x_BHWC, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        -1)
    x = nn.Dense(2 * C, use_bias=False, dtype=dt, param_dtype=pdt, name='reduction')(x)
    return nn.LayerNorm(_TORCH_LN_EPS, dtype=dt, param_dtype=pdt, name='norm')(x)


class Stage(nn.Module):
  """The blocks of one stage, then patch merging unless it is the last stage."""
  cfg: SwinV2Config
  stage: int

  @nn.compact
  def __call__(self, x_BHWC):
    cfg, s = self.cfg, self.stage
    for b in range(cfg.depths[s]):
      window, shift = window_and_shift(cfg, s, b)
      x_BHWC = SwinBlock(cfg, cfg.num_heads[s], window, shift, cfg.pretrained_window_sizes[s],
                         name=f'blocks_{b}')(x_BHWC)
    if s < cfg.num_stages - 1:
      x_BHWC = PatchMerging(cfg, name='downsample')(x_BHWC)
    return x_BHWC


class SwinV2(nn.Module):
  """Channels-last pixels [B, S, S, C] -> patch embeddings [B, N, D] in the compute dtype.

  N is the grid of the chosen hidden state squared, in row-major order (64 for Swin V2 at 256
  pixels with patch 4 and four stages).
  """
  cfg: SwinV2Config

  @nn.compact
  def __call__(self, pixels_BHWC):
    cfg = self.cfg
    check_pixels(pixels_BHWC, cfg.image_size, cfg.num_channels, 'SwinV2')
    dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    P = cfg.patch_size
    x = nn.Conv(cfg.embed_dim, (P, P), strides=(P, P), padding='VALID', dtype=dt, param_dtype=pdt,
                name='patch_embed')(pixels_BHWC.astype(dt))
    x = nn.LayerNorm(_TORCH_LN_EPS, dtype=dt, param_dtype=pdt, name='embed_norm')(x)
    for s in range(cfg.run_stages):
      x = Stage(cfg, s, name=f'stages_{s}')(x)
    if cfg.run_stages == cfg.num_stages:
      x = nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name='layernorm')(x)
    B, H, W, D = x.shape
    return x.reshape(B, H * W, D)
