"""A Llama-style decoder whose every projection is a context-indexed `ContextDense`.

RMSNorm, rotary position embeddings with a configurable base, SwiGLU (optionally with a fused
gate+up projection, as the paper's LLM), grouped-query attention, optional q/k/v biases (Qwen2),
tied or untied embeddings, causal attention with a padding mask. The layers run under
`nn.scan`, so every parameter and adaptor table carries a leading layer axis. The decoder takes
token ids or input embeddings (image embeddings are spliced in by the caller) plus context ids.

For generation, a `KVCache` (static shape [layers, B, max_len, kv_heads, head_dim]) passed to
the decoder turns a call into an incremental one: the new positions' keys and values are
written at the cache index and attention runs over every filled, non-padding slot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import adaptors
from cpeft_jax.adaptors import ContextDense, PeftConfig

# Collection that attention weights are sown into when it is mutable (attention heatmaps).
INTERMEDIATES = 'intermediates'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of the decoder. dtype is the compute dtype, param_dtype the base's."""
  vocab_size: int = 32000
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: int | None = None  # None: as num_heads (no grouped-query attention)
  head_dim: int | None = None  # None: hidden_size // num_heads
  intermediate_size: int = 3072
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = False
  fused_gate_up: bool = False
  residual_dropout: float = 0.0
  remat: bool = False
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f'model.{name} must be a positive integer, got {v!r}.')
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f'model.hidden_size={self.hidden_size} is not divisible by '
                       f'model.num_heads={self.num_heads}; set model.head_dim.')
    if self.num_heads % self.kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must be a multiple of '
                       f'model.num_kv_heads={self.kv_heads}.')
    if self.dims % 2:
      raise ValueError(f'head_dim={self.dims} must be even for rotary embeddings.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'model.{name}={getattr(self, name)!r}; expected one of {list(DTYPES)}.')
    if not 0.0 <= self.residual_dropout < 1.0:
      raise ValueError(f'model.residual_dropout must be in [0, 1), got {self.residual_dropout}.')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DecoderConfig:
    return adaptors.config_from_dict(cls, d, 'model')

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dims(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def projections(self) -> tuple[adaptors.Projection, ...]:
    """The adaptable projections of one block, for target selection."""
    P = adaptors.Projection
    attn = (P('attn/q_proj', 'A'), P('attn/k_proj', 'A', 'out'), P('attn/v_proj', 'A', 'out'),
            P('attn/o_proj', 'A'))
    mlp = (P('mlp/gate_up_proj', 'F'),) if self.fused_gate_up else (
        P('mlp/gate_proj', 'F'), P('mlp/up_proj', 'F'))
    return attn + mlp + (P('mlp/down_proj', 'F', 'in'),)


@flax.struct.dataclass
class KVCache:
  """Keys and values of the positions seen so far, for incremental decoding under jit.

  key/value_NBMGK: [layers, B, max_len, kv_heads, head_dim] in the compute dtype (RoPE applied);
  valid_BM: slots filled by a non-padding token; index: the next slot to fill (one for all rows).
  """
  key_NBMGK: jax.Array
  value_NBMGK: jax.Array
  valid_BM: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, cfg: DecoderConfig, batch_size: int, max_len: int) -> KVCache:
    shape = (cfg.num_layers, batch_size, max_len, cfg.kv_heads, cfg.dims)
    zeros = jnp.zeros(shape, DTYPES[cfg.dtype])
    return cls(zeros, zeros, jnp.zeros((batch_size, max_len), bool), jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid_BM.shape[1]

  def take(self, rows):
    """The cache of rows `rows` (e.g. repeated for beams, or reordered by beam origin)."""
    return self.replace(key_NBMGK=jnp.take(self.key_NBMGK, rows, axis=1),
                        value_NBMGK=jnp.take(self.value_NBMGK, rows, axis=1),
                        valid_BM=jnp.take(self.valid_BM, rows, axis=0))


class RMSNorm(nn.Module):
  """x / rms(x) * weight, normalised in float32 (as transformers' LlamaRMSNorm)."""
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param('weight', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return w.astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(positions_BL, dims: int, theta: float):
  """cos, sin [B, L, dims] in transformers' rotate-half layout."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dims, 2, dtype=jnp.float32) / dims))
  freqs = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BLHK, cos_BLK, sin_BLK):
  half = x_BLHK.shape[-1] // 2
  rotated = jnp.concatenate([-x_BLHK[..., half:], x_BLHK[..., :half]], -1)
  cos, sin = cos_BLK[:, :, None, :], sin_BLK[:, :, None, :]
  return (x_BLHK.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BLHK.dtype)


class _Sub(nn.Module):
  """Shared fields of the attention and feed-forward sub-layers."""
  cfg: DecoderConfig
  peft: PeftConfig | None
  targets: tuple[tuple[str, adaptors.LayerAdaptor], ...]
  deterministic: bool = True

  def dense(self, name, features, use_bias=False):
    cfg = self.cfg
    return ContextDense(features, use_bias=use_bias, peft=self.peft,
                        adapt=dict(self.targets)[f'{self.name}/{name}'],
                        dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                        deterministic=self.deterministic, name=name)


class Attention(_Sub):
  """Grouped-query causal self-attention with rotary embeddings."""

  @nn.compact
  def __call__(self, x_BLD, routing, mask, cos, sin, kv=None, index=None):
    """Without `kv`, causal attention within x (mask: [B,1,1,L] padding or None).

    With kv = this layer's cached (keys, values) [B, M, G, K], the new keys and values are
    written at slot `index` and the queries attend over the cache (mask: [B,1,L,M], causal and
    padding already folded in); returns (out, updated kv).
    """
    cfg = self.cfg
    B, L, _ = x_BLD.shape
    H, G, K = cfg.num_heads, cfg.kv_heads, cfg.dims
    q = self.dense('q_proj', H * K, cfg.qkv_bias)(x_BLD, routing).reshape(B, L, H, K)
    k = self.dense('k_proj', G * K, cfg.qkv_bias)(x_BLD, routing).reshape(B, L, G, K)
    v = self.dense('v_proj', G * K, cfg.qkv_bias)(x_BLD, routing).reshape(B, L, G, K)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
      if self.is_mutable_collection(INTERMEDIATES):  # for attention heatmaps only
        self.sow(INTERMEDIATES, 'attention_probs', attention_probs(q, k, mask))
    else:
      key_BMGK, value_BMGK = kv
      key_BMGK = jax.lax.dynamic_update_slice_in_dim(key_BMGK, k.astype(key_BMGK.dtype), index, 1)
      value_BMGK = jax.lax.dynamic_update_slice_in_dim(value_BMGK, v.astype(value_BMGK.dtype),
                                                       index, 1)
      out = jax.nn.dot_product_attention(q, key_BMGK.astype(q.dtype), value_BMGK.astype(q.dtype),
                                         mask=mask)
      kv = (key_BMGK, value_BMGK)
    return self.dense('o_proj', cfg.hidden_size)(out.reshape(B, L, H * K), routing), kv


def attention_probs(q_BLHK, k_BLGK, mask=None):
  """Causal softmax attention weights [B, H, L, L] (queries x keys), as the fused kernel uses."""
  H, G = q_BLHK.shape[2], k_BLGK.shape[2]
  k_BLHK = jnp.repeat(k_BLGK, H // G, axis=2)
  scores = jnp.einsum('bqhk,bshk->bhqs', q_BLHK, k_BLHK).astype(jnp.float32)
  scores = scores / np.sqrt(q_BLHK.shape[-1])
  L = q_BLHK.shape[1]
  allowed = jnp.tril(jnp.ones((L, L), bool))[None, None]
  if mask is not None:
    allowed = allowed & mask
  return jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)


class Mlp(_Sub):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up optionally fused."""

  @nn.compact
  def __call__(self, x_BLD, routing):
    cfg = self.cfg
    I = cfg.intermediate_size
    if cfg.fused_gate_up:
      gate, up = jnp.split(self.dense('gate_up_proj', 2 * I)(x_BLD, routing), 2, axis=-1)
    else:
      gate = self.dense('gate_proj', I)(x_BLD, routing)
      up = self.dense('up_proj', I)(x_BLD, routing)
    return self.dense('down_proj', cfg.hidden_size)(nn.silu(gate) * up, routing)


class Block(nn.Module):
  """One pre-norm decoder layer, shaped for nn.scan: (x, shared, kv) -> (x, kv).

  kv is this layer's slice of a `KVCache` (keys, values), or None without a cache.
  """
  cfg: DecoderConfig
  peft: PeftConfig | None
  targets: tuple[tuple[str, adaptors.LayerAdaptor], ...]
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD, shared, kv=None):
    routing, mask, cos, sin, index = shared
    cfg = self.cfg
    sub = dict(cfg=cfg, peft=self.peft, targets=self.targets, deterministic=self.deterministic)
    drop = nn.Dropout(cfg.residual_dropout, deterministic=self.deterministic)
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, DTYPES[cfg.param_dtype], name=name)
    h, kv = Attention(**sub, name='attn')(norm('input_layernorm')(x_BLD), routing, mask, cos, sin,
                                          kv, index)
    x_BLD = x_BLD + drop(h)
    h = Mlp(**sub, name='mlp')(norm('post_attention_layernorm')(x_BLD), routing)
    return x_BLD + drop(h), kv


class Decoder(nn.Module):
  """Token ids or input embeddings plus context ids in, logits out.

  Variables: 'params' (the frozen base; embed_tokens, layers, norm, lm_head) and 'adaptors'
  (the per-context tables, each with a leading layer axis).
  """
  cfg: DecoderConfig
  peft: PeftConfig | None = None
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    targets = adaptors.resolve_targets(self.peft, cfg.projections())
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                                 embedding_init=nn.initializers.normal(0.02),
                                 param_dtype=DTYPES[cfg.param_dtype])
    block = Block
    if cfg.remat:
      block = nn.remat(block, prevent_cse=False)
    self.layers = nn.scan(
        block, variable_axes={'params': 0, adaptors.ADAPTORS: 0, INTERMEDIATES: 0},
        split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast, 0),
        length=cfg.num_layers)(cfg, self.peft, tuple(sorted(targets.items())), self.deterministic)
    self.norm = RMSNorm(cfg.rms_norm_eps, DTYPES[cfg.param_dtype])
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=DTYPES[cfg.dtype],
                              param_dtype=DTYPES[cfg.param_dtype],
                              kernel_init=nn.initializers.normal(0.02))

  @property
  def num_contexts(self) -> int:
    return self.peft.num_contexts if self.peft is not None else 1

  def embed(self, tokens_BL):
    """Input embeddings of token ids, in the compute dtype (to splice image embeddings into)."""
    return self.embed_tokens(tokens_BL).astype(DTYPES[self.cfg.dtype])

  def __call__(self, tokens_BL=None, *, embeddings_BLD=None, context_ids_BL=None,
               attention_mask_BL=None, positions_BL=None, return_hidden=False, cache=None):
    """Logits [B, L, vocab] in float32 (or the final hidden states with return_hidden).

    With a `KVCache`, the L positions are the next ones after those cached (slots index ..
    index+L-1; default positions likewise) and the call returns (logits, updated cache).
    """
    cfg = self.cfg
    if (tokens_BL is None) == (embeddings_BLD is None):
      raise ValueError('Decoder takes exactly one of tokens_BL and embeddings_BLD.')
    x_BLD = self.embed(tokens_BL) if embeddings_BLD is None else embeddings_BLD.astype(
        DTYPES[cfg.dtype])
    B, L = x_BLD.shape[:2]
    if context_ids_BL is None:
      context_ids_BL = jnp.zeros((B, L), jnp.int32)
    elif tuple(context_ids_BL.shape) != (B, L):
      raise ValueError(f'context_ids_BL has shape {tuple(context_ids_BL.shape)}; expected the '
                       f'token shape {(B, L)}.')
    adaptors.check_context_ids(context_ids_BL, self.num_contexts, 'context_ids_BL')
    routing = (adaptors.route(context_ids_BL, self.peft)
               if self.peft is not None and self.peft.methods else None)
    if cache is not None:
      return self._cached(x_BLD, routing, attention_mask_BL, positions_BL, return_hidden, cache)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    mask_B11L = None
    if attention_mask_BL is not None:
      mask_B11L = jnp.asarray(attention_mask_BL, bool)[:, None, None, :]
    cos, sin = rope_tables(positions_BL, cfg.dims, cfg.rope_theta)
    x_BLD, _ = self.layers(x_BLD, (routing, mask_B11L, cos, sin, None), None)
    return self._head(x_BLD, return_hidden)

  def _cached(self, x_BLD, routing, attention_mask_BL, positions_BL, return_hidden, cache):
    cfg = self.cfg
    B, L = x_BLD.shape[:2]
    M = cache.max_len
    if cache.valid_BM.shape[0] != B or cache.key_NBMGK.shape[0] != cfg.num_layers:
      raise ValueError(f'The cache holds {cache.valid_BM.shape[0]} rows of '
                       f'{cache.key_NBMGK.shape[0]} layers; expected {B} rows (the batch) of '
                       f'{cfg.num_layers} layers.')
    if L > M:
      raise ValueError(f'{L} new positions do not fit a cache of max_len={M}.')
    index = cache.index
    slots_L = index + jnp.arange(L, dtype=jnp.int32)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(slots_L, (B, L))
    new_valid_BL = (jnp.ones((B, L), bool) if attention_mask_BL is None
                    else jnp.asarray(attention_mask_BL, bool))
    valid_BM = jax.lax.dynamic_update_slice_in_dim(cache.valid_BM, new_valid_BL, index, 1)
    # A query in slot s sees the filled, non-padding slots up to s (later slots are unfilled).
    causal_LM = jnp.arange(M, dtype=jnp.int32)[None, :] <= slots_L[:, None]
    mask_B1LM = (valid_BM[:, None, :] & causal_LM[None])[:, None]
    cos, sin = rope_tables(positions_BL, cfg.dims, cfg.rope_theta)
    x_BLD, (key, value) = self.layers(x_BLD, (routing, mask_B1LM, cos, sin, index),
                                      (cache.key_NBMGK, cache.value_NBMGK))
    cache = KVCache(key, value, valid_BM, index + L)
    return self._head(x_BLD, return_hidden), cache

  def _head(self, x_BLD, return_hidden):
    x_BLD = self.norm(x_BLD)
    if return_hidden:
      return x_BLD
    if self.cfg.tie_embeddings:
      logits = x_BLD @ self.embed_tokens.embedding.astype(x_BLD.dtype).T
    else:
      logits = self.lm_head(x_BLD)
    return logits.astype(jnp.float32)
