"""A frozen ViT image encoder (CLIP and SigLIP vision towers) and helpers shared with Swin V2.

The two towers share one pre-norm block (LayerNorm, multi-head attention with biases, LayerNorm,
two-layer MLP) and differ only in what `ViTConfig` says: CLIP adds a class token, has no patch
bias, normalises the embeddings (`pre_layrnorm`) and leaves its last hidden state
un-normalised (its post_layernorm only sees the pooled class token); SigLIP has a patch bias, no
class token and normalises the last hidden state (`post_layernorm`).

Which hidden state comes out (`feature_layer`) follows transformers' `hidden_states` tuple of
L + 1 entries: index 0 is the input of the first layer, index k the output of layer k. The last
one (-1 or L) is transformers' `last_hidden_state`, so SigLIP's is post-normed; every other index
is the raw residual stream, before any final norm (as LLaVA takes CLIP's -2). Only the layers up
to the chosen one are built, loaded and run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpeft_jax import configlib
from cpeft_jax.models.decoder_config import DTYPES

# transformers' ACT2FN names -> functions (gelu is the exact erf form there).
ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


def square(value, name: str) -> int:
  """An image or patch size given as an int or an [n, n] pair; non-square ones are refused."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f'{name}={list(value)}; only square sizes (an int or [n, n]) are supported.')
    value = value[0]
  if not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  return value


def resolve_feature_layer(feature_layer: int, num_states: int, where: str) -> int:
  """The non-negative index of `feature_layer` into a tuple of `num_states` hidden states."""
  if not isinstance(feature_layer, int) or not -num_states <= feature_layer < num_states:
    raise ValueError(f'{where}.feature_layer={feature_layer!r}; expected an integer in '
                     f'[{-num_states}, {num_states - 1}] (an index into the {num_states} hidden '
                     'states: the embeddings, then the output of each layer or stage).')
  return feature_layer % num_states


def check_pixels(pixels_BHWC, image_size: int, num_channels: int, model: str):
  """Refuses pixels of a shape the encoder was not built for (shapes are static under jit)."""
  shape = tuple(pixels_BHWC.shape)
  if len(shape) != 4 or shape[1:] != (image_size, image_size, num_channels):
    raise ValueError(f'{model} takes channels-last pixels [B, {image_size}, {image_size}, '
                     f'{num_channels}], got shape {shape}.')


def check_common(cfg, where: str):
  """Checks of the activation and dtype fields that every encoder config has."""
  if cfg.hidden_act not in ACTIVATIONS:
    raise ValueError(f'{where}.hidden_act={cfg.hidden_act!r}; expected one of {list(ACTIVATIONS)}.')
  for name in ('dtype', 'param_dtype'):
    if getattr(cfg, name) not in DTYPES:
      raise ValueError(f'{where}.{name}={getattr(cfg, name)!r}; expected one of {list(DTYPES)}.')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape, numerics and output choice of a ViT vision tower (see the module docstring)."""
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  layer_norm_eps: float = 1e-6
  hidden_act: str = 'gelu_pytorch_tanh'
  class_token: bool = False  # CLIP: a learned class token ahead of the patches
  patch_bias: bool = True  # SigLIP's patch convolution has a bias, CLIP's does not
  pre_norm: bool = False  # CLIP's pre_layrnorm on the embeddings
  final_norm: bool = True  # SigLIP's post_layernorm on the last hidden state
  feature_layer: int = -1  # index into the num_layers + 1 hidden states
  drop_cls: bool = True  # drop the class token from the output (no-op without one)
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    for name in ('image_size', 'patch_size', 'num_channels', 'hidden_size', 'intermediate_size',
                 'num_layers', 'num_heads'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f'vision.{name} must be a positive integer, got {v!r}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'vision.hidden_size={self.hidden_size} is not divisible by '
                       f'vision.num_heads={self.num_heads}.')
    if self.image_size < self.patch_size:
      raise ValueError(f'vision.image_size={self.image_size} is smaller than '
                       f'vision.patch_size={self.patch_size}.')
    check_common(self, 'vision')
    resolve_feature_layer(self.feature_layer, self.num_layers + 1, 'vision')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ViTConfig:
    return configlib.config_from_dict(cls, d, 'vision')

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def run_layers(self) -> int:
    """How many layers run: the index of `feature_layer` into the hidden states."""
    return resolve_feature_layer(self.feature_layer, self.num_layers + 1, 'vision')

  @property
  def applies_final_norm(self) -> bool:
    return self.final_norm and self.run_layers == self.num_layers

  @property
  def num_tokens(self) -> int:
    """Length of the output sequence."""
    return self.grid ** 2 + int(self.class_token and not self.drop_cls)


class ViTBlock(nn.Module):
  """One pre-norm encoder layer, shaped for nn.scan: (x, None) -> (x, None)."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x_BTD, _):
    cfg = self.cfg
    dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    B, T, D = x_BTD.shape
    H = cfg.num_heads
    dense = lambda features, name: nn.Dense(features, dtype=dt, param_dtype=pdt, name=name)
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name=name)

    h = norm('layer_norm1')(x_BTD)
    q, k, v = (dense(D, n)(h).reshape(B, T, H, D // H) for n in ('q_proj', 'k_proj', 'v_proj'))
    h = jax.nn.dot_product_attention(q, k, v).reshape(B, T, D)  # scale 1/sqrt(head_dim)
    x_BTD = x_BTD + dense(D, 'out_proj')(h)

    h = norm('layer_norm2')(x_BTD)
    h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, 'fc1')(h))
    return x_BTD + dense(D, 'fc2')(h), None


class ViT(nn.Module):
  """Channels-last pixels [B, S, S, C] -> patch embeddings [B, N, D] in the compute dtype.

  N = (S / patch)^2, plus one leading class token when the config has one and keeps it.
  """
  cfg: ViTConfig

  @nn.compact
  def __call__(self, pixels_BHWC):
    cfg = self.cfg
    check_pixels(pixels_BHWC, cfg.image_size, cfg.num_channels, 'ViT')
    dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    D, P = cfg.hidden_size, cfg.patch_size
    x = nn.Conv(D, (P, P), strides=(P, P), padding='VALID', use_bias=cfg.patch_bias, dtype=dt,
                param_dtype=pdt, name='patch_embedding')(pixels_BHWC.astype(dt))
    B = x.shape[0]
    x_BTD = x.reshape(B, -1, D)  # row-major over the patch grid, as torch's flatten(2)
    if cfg.class_token:
      cls_D = self.param('class_embedding', nn.initializers.normal(0.02), (D,), pdt)
      x_BTD = jnp.concatenate([jnp.broadcast_to(cls_D.astype(dt), (B, 1, D)), x_BTD], 1)
    pos_TD = self.param('position_embedding', nn.initializers.normal(0.02),
                        (x_BTD.shape[1], D), pdt)
    x_BTD = x_BTD + pos_TD.astype(dt)
    if cfg.pre_norm:
      x_BTD = nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name='pre_layrnorm')(
          x_BTD)
    if cfg.run_layers:
      x_BTD, _ = nn.scan(ViTBlock, variable_axes={'params': 0}, split_rngs={'params': True},
                         length=cfg.run_layers)(cfg, name='layers')(x_BTD, None)
    if cfg.applies_final_norm:
      x_BTD = nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                           name='post_layernorm')(x_BTD)
    if cfg.class_token and cfg.drop_cls:
      x_BTD = x_BTD[:, 1:]
    return x_BTD


def vit_config_from_hf(hf: Mapping[str, Any], *, name: str, model_types: tuple[str, ...],
                       defaults: Mapping[str, Any], arch: Mapping[str, Any],
                       **overrides) -> ViTConfig:
  """A `ViTConfig` from a config.json dict: the tower's shape, with transformers' `defaults`
  where keys are absent, the architecture's fixed choices `arch`, then `overrides`.

  A full two-tower checkpoint (model_types[0], e.g. 'clip') holds the shape in vision_config.
  """
  if hf.get('model_type') not in model_types:
    raise ValueError(f'model_type={hf.get("model_type")!r} is not {name}; expected one of '
                     f'{model_types}.')
  if hf['model_type'] == model_types[0]:
    hf = hf.get('vision_config') or {}
  get = lambda key: hf_value(hf, key, defaults)
  fields = dict(
      image_size=square(get('image_size'), 'vision_config.image_size'),
      patch_size=square(get('patch_size'), 'vision_config.patch_size'),
      num_channels=get('num_channels'), hidden_size=get('hidden_size'),
      intermediate_size=get('intermediate_size'), num_layers=get('num_hidden_layers'),
      num_heads=get('num_attention_heads'), layer_norm_eps=float(get('layer_norm_eps')),
      hidden_act=get('hidden_act'), **arch)
  fields.update(overrides)
  return ViTConfig.from_dict(fields)


def hf_value(hf: Mapping[str, Any], key: str, defaults: Mapping[str, Any]):
  """A config.json value, or transformers' default where the key is absent or null."""
  value = hf.get(key)
  if value is None:
    if key not in defaults:
      raise ValueError(f'config.json lacks {key!r}, which has no default.')
    return defaults[key]
  return value
