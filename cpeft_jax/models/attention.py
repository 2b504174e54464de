"""Causal self-attention of the decoders, the rotary tables it may apply, and its KV cache.

`Attention` is grouped-query attention over context-indexed projections (`ContextDense`), with
rotary embeddings when the caller passes cos/sin tables (Llama) and none otherwise (GPT-2, OPT
add learned positions to the embeddings). For generation, a `KVCache` (static shape
[layers, B, kv_heads, max_len, head_dim]) makes a call incremental: the new positions' keys and
values are written at the cache index and `cached_attention` reads every filled, non-padding
slot in place. Training's attention (`causal_attention`) keeps only q, k and v for the backward
pass and recomputes its scores and weights there (`recomputed`).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import adaptors
from cpeft_jax.adaptors import ContextDense, PeftConfig
from cpeft_jax.models.decoder_config import DTYPES, PROJECTION_NAMES, DecoderConfig

# Collection that attention weights are sown into when it is mutable (attention heatmaps).
INTERMEDIATES = 'intermediates'


@flax.struct.dataclass
class KVCache:
  """Keys and values of the positions seen so far, for incremental decoding under jit.

  key/value_NBGMK: [layers, B, kv_heads, max_len, head_dim] in the compute dtype (RoPE applied),
  heads before slots so that a query's dots read them without a transpose; valid_BM: slots
  filled by a non-padding token; index: the next slot to fill (one for all rows).
  A decoding loop holds the keys and values as tuples of per-layer arrays [B, G, M, K]
  (`per_layer` / `stacked`), so that no step copies a layer's slice out of the stack.
  """
  key_NBGMK: Any
  value_NBGMK: Any
  valid_BM: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, cfg: DecoderConfig, batch_size: int, max_len: int) -> KVCache:
    shape = (cfg.num_layers, batch_size, cfg.kv_heads, max_len, cfg.dims)
    zeros = jnp.zeros(shape, DTYPES[cfg.dtype])
    return cls(zeros, zeros, jnp.zeros((batch_size, max_len), bool), jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid_BM.shape[1]

  def per_layer(self) -> KVCache:
    """Keys and values as tuples of per-layer arrays (for a decoding loop's state)."""
    if isinstance(self.key_NBGMK, tuple):
      return self
    return self.replace(key_NBGMK=tuple(self.key_NBGMK), value_NBGMK=tuple(self.value_NBGMK))

  def stacked(self) -> KVCache:
    """Keys and values as [layers, ...] arrays again (what the decoder takes)."""
    if not isinstance(self.key_NBGMK, tuple):
      return self
    return self.replace(key_NBGMK=jnp.stack(self.key_NBGMK),
                        value_NBGMK=jnp.stack(self.value_NBGMK))

  def take(self, rows):
    """The cache of rows `rows` (e.g. repeated for beams, or reordered by beam origin)."""
    axis = 0 if isinstance(self.key_NBGMK, tuple) else 1
    take = lambda x: jnp.take(x, rows, axis=axis)
    return self.replace(key_NBGMK=jax.tree.map(take, self.key_NBGMK),
                        value_NBGMK=jax.tree.map(take, self.value_NBGMK),
                        valid_BM=jnp.take(self.valid_BM, rows, axis=0))


def recomputed(fn, **checkpoint_kw):
  """`fn` as the backward pass sees it: its inputs kept, its intermediates (an activation's
  sigmoid, silu or tanh; a norm's float32 copy; attention's scores and weights) recomputed from
  them instead of kept for every layer. Cheap next to the matmuls, and the saving grows with the
  layers (and, for attention, with the square of the length); prevent_cse stops XLA from merging
  the recomputation back into the forward pass where layers are unrolled.
  `checkpoint_kw`: jax.checkpoint's (e.g. static_argnums)."""
  return jax.checkpoint(fn, prevent_cse=True, **checkpoint_kw)


@recomputed
def causal_attention(q_BLHK, k_BLGK, v_BLGK, mask):
  """jax.nn.dot_product_attention, causal (mask: [B,1,1,L] padding or None), recomputed in the
  backward pass: XLA's attention keeps its [B, H, L, L] weights twice (float32 for the softmax,
  the compute dtype for the values' matmul) for every layer. bench/: paper shape, bf16 Context-LoRA
  C=2, 40 MiB less XLA memory at batch 8 x 128, 482 MiB less at 2 x 1024; float32 LoRA, 149 MiB
  less at 8 x 128; step time unchanged (CPU time per step at 2 x 1024: 30.9 s against 31.0)."""
  return jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, mask=mask, is_causal=True)


def rope_frequencies(cfg: DecoderConfig) -> np.ndarray:
  """Inverse frequencies [dims / 2], scaled as transformers' rope_type 'linear' or 'llama3'."""
  dims = cfg.dims
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dims, 2, dtype=np.float32) / dims))
  if cfg.rope_type == 'linear':
    inv_freq = inv_freq / cfg.rope_factor
  elif cfg.rope_type == 'llama3':  # long wavelengths / factor, short kept, a smooth ramp between
    factor, old_len = cfg.rope_factor, cfg.rope_original_max_positions
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_tables(positions_BL, cfg: DecoderConfig):
  """cos, sin [B, L, dims] in transformers' rotate-half layout."""
  freqs = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(cfg))
  emb = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BLHK, cos_BLK, sin_BLK):
  half = x_BLHK.shape[-1] // 2
  rotated = jnp.concatenate([-x_BLHK[..., half:], x_BLHK[..., :half]], -1)
  cos, sin = cos_BLK[:, :, None, :], sin_BLK[:, :, None, :]
  return (x_BLHK.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BLHK.dtype)


class SubLayer(nn.Module):
  """Shared fields of a block's sub-layers (attention here, the MLPs in llama.py and gpt2.py):
  `dense` builds one of its adaptable projections."""
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


class Attention(SubLayer):
  """Grouped-query causal self-attention, with rotary embeddings when given cos and sin.

  Llama: q/k/v biases per cfg.qkv_bias, none on o_proj. The learned-position decoders (GPT-2,
  OPT) subclass it with `biases` on every projection; the output projection's name is the
  architecture's (PROJECTION_NAMES).
  """
  biases = False  # a bias on every projection (else on q/k/v per cfg.qkv_bias)

  @nn.compact
  def __call__(self, x_BLD, routing, mask, cos, sin, kv=None, index=None, kept=None):
    """Without `kv`, causal attention within x (mask: [B,1,1,L] padding or None).

    With kv = this layer's cached (keys, values) [B, G, M, K], the new keys and values are
    written at slot `index` and the queries attend over the cache (mask: [B,1,L,M], causal and
    padding already folded in); returns (out, updated kv). There, kept = (n, the routing of the
    last n positions) computes the output of those positions only (their queries and output
    projection; keys and values are written for all L): a prefill's last layer.
    """
    cfg = self.cfg
    B, L, _ = x_BLD.shape
    H, G, K = cfg.num_heads, cfg.kv_heads, cfg.dims
    out_name = PROJECTION_NAMES[cfg.arch][0]
    bias = self.biases
    xq_BQD, q_routing = x_BLD, routing
    if kept is not None:
      if kv is None:
        raise ValueError('Attention computes only the last positions (kept) with a KV cache.')
      xq_BQD, q_routing = x_BLD[:, -kept[0]:], kept[1]
    Q = xq_BQD.shape[1]
    q = self.dense('q_proj', H * K, bias or cfg.qkv_bias)(xq_BQD, q_routing).reshape(B, Q, H, K)
    k = self.dense('k_proj', G * K, bias or cfg.qkv_bias)(x_BLD, routing).reshape(B, L, G, K)
    v = self.dense('v_proj', G * K, bias or cfg.qkv_bias)(x_BLD, routing).reshape(B, L, G, K)
    if cos is not None:
      q, k = apply_rope(q, cos[:, L - Q:], sin[:, L - Q:]), apply_rope(k, cos, sin)
    if kv is None:
      out = causal_attention(q, k, v, mask)
      if self.is_mutable_collection(INTERMEDIATES):  # for attention heatmaps only
        self.sow(INTERMEDIATES, 'attention_probs', attention_probs(q, k, mask))
    else:
      key_BGMK, value_BGMK = kv
      write = lambda cache, new_BLGK: jax.lax.dynamic_update_slice_in_dim(
          cache, new_BLGK.transpose(0, 2, 1, 3).astype(cache.dtype), index, 2)
      kv = (write(key_BGMK, k), write(value_BGMK, v))
      out = cached_attention(q, *kv, mask[:, :, L - Q:])
    return self.dense(out_name, cfg.hidden_size, bias)(out.reshape(B, Q, H * K), q_routing), kv


def cached_attention(q_BLHK, key_BGMK, value_BGMK, mask_B1LM):
  """Softmax attention of L queries over a cache laid out [B, G, M, K] (grouped-query: query
  head h reads kv head h // (H / G)), as jax.nn.dot_product_attention computes it (scores and
  softmax in float32) but reading the cache in place: that function wants [B, M, G, K] and a
  one-token step would transpose the whole cache of every layer."""
  B, L, H, K = q_BLHK.shape
  G = key_BGMK.shape[1]
  q_BGRLK = q_BLHK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4)
  scores = jnp.einsum('bgrlk,bgmk->bgrlm', q_BGRLK, key_BGMK.astype(q_BLHK.dtype),
                      preferred_element_type=jnp.float32) / np.sqrt(K).astype(np.float32)
  scores = jnp.where(mask_B1LM[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BLHK.dtype)
  out = jnp.einsum('bgrlm,bgmk->bgrlk', probs, value_BGMK.astype(q_BLHK.dtype))
  return out.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


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
