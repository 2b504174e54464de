"""A Llama-style decoder whose every projection is a context-indexed `ContextDense`.

This module also holds what the other decoders (gpt2.py, opt.py) share with it: the config,
the attention core, the block and its layer scan, the KV cache and the forward pass; they
subclass `Block` and `Decoder` and change names, norms, the MLP and the position embedding.
Build a decoder of any architecture with `decoders.make_decoder(cfg)`.

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

from cpeft_jax import adaptors, configlib
from cpeft_jax.adaptors import ContextDense, PeftConfig

# Collection that attention weights are sown into when it is mutable (attention heatmaps).
INTERMEDIATES = 'intermediates'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
ARCHS = ('llama', 'gpt2', 'opt')
ROPE_TYPES = ('default', 'linear', 'llama3')
# Feed-forward activations by Hugging Face name (gelu_new is GPT-2's tanh approximation).
ACTIVATIONS = {'silu': nn.silu, 'swish': nn.silu, 'relu': nn.relu,
               'gelu': lambda x: nn.gelu(x, approximate=False),
               'gelu_new': lambda x: nn.gelu(x, approximate=True),
               'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of the decoder. dtype is the compute dtype, param_dtype the base's.

  arch picks the block: 'llama' (RMSNorm, rotary, SwiGLU), 'gpt2' or 'opt' (learned positions,
  LayerNorm, biases, a two-layer MLP with `activation`). The rope_* fields are Llama's rotary
  scaling ('linear': positions / factor; 'llama3': Llama 3.1's per-frequency interpolation);
  max_positions .. embed_dim concern the learned-position decoders only.
  """
  arch: str = 'llama'
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
  # Layers as straight-line code (their parameters still stacked [num_layers, ...]). None: when
  # computing in bf16/fp16 without remat, where XLA:CPU's layer loop round-trips every value
  # through float32, which costs more than the longer compile (bench/: paper shape, bf16 train
  # step 1.2x faster on one core); in float32 the loop is as fast or faster and compiles
  # sooner. With remat the loop stays: XLA schedules unrolled layers' recomputation so that it
  # saves no memory (bench/: the same XLA peak with and without remat).
  unroll_layers: bool | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  rope_type: str = 'default'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_positions: int = 8192  # llama3 only
  max_positions: int = 1024  # size of the learned position table (gpt2, opt)
  layer_norm_eps: float = 1e-5  # gpt2, opt
  activation: str = 'silu'  # SwiGLU's gate for llama; the MLP's activation for gpt2/opt
  pre_norm: bool = True  # False: OPT-350m's post-norm blocks (do_layer_norm_before=false)
  embed_dim: int | None = None  # OPT's word_embed_proj_dim where it differs from hidden_size

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f'model.arch={self.arch!r}; expected one of {ARCHS}.')
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
    if self.arch == 'llama':
      self._check_llama()
    else:
      self._check_learned()
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'model.{name}={getattr(self, name)!r}; expected one of {list(DTYPES)}.')
    if not 0.0 <= self.residual_dropout < 1.0:
      raise ValueError(f'model.residual_dropout must be in [0, 1), got {self.residual_dropout}.')

  def _check_llama(self):
    if self.dims % 2:
      raise ValueError(f'head_dim={self.dims} must be even for rotary embeddings.')
    if self.activation not in ('silu', 'swish'):
      raise ValueError(f"model.activation={self.activation!r}; arch 'llama' is SwiGLU ('silu').")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'model.rope_type={self.rope_type!r}; expected one of {ROPE_TYPES}.')
    if self.rope_factor <= 0:
      raise ValueError(f'model.rope_factor must be positive, got {self.rope_factor}.')
    if self.rope_type == 'llama3' and not self.rope_high_freq_factor > self.rope_low_freq_factor:
      raise ValueError(f'model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed '
                       f'model.rope_low_freq_factor={self.rope_low_freq_factor}.')
    if not self.pre_norm or self.embed_dim is not None:
      raise ValueError("model.pre_norm=False and model.embed_dim are for arch 'opt' only.")

  def _check_learned(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'model.activation={self.activation!r}; expected one of '
                       f'{list(ACTIVATIONS)}.')
    if self.num_kv_heads not in (None, self.num_heads) or self.fused_gate_up:
      raise ValueError(f'model.arch={self.arch!r} has no grouped-query attention or gate '
                       'projection (num_kv_heads, fused_gate_up are for llama).')
    if self.rope_type != 'default':
      raise ValueError(f'model.arch={self.arch!r} has learned positions, not rope_type.')
    if not isinstance(self.max_positions, int) or self.max_positions < 1:
      raise ValueError(f'model.max_positions must be a positive integer, got '
                       f'{self.max_positions!r}.')
    if self.arch == 'gpt2' and (not self.pre_norm or self.embed_dim is not None):
      raise ValueError("model.pre_norm=False and model.embed_dim are for arch 'opt' only.")

  @property
  def embed_width(self) -> int:
    """Width of the token embedding table (OPT may project it in and out of hidden_size)."""
    return self.embed_dim or self.hidden_size

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DecoderConfig:
    return configlib.config_from_dict(cls, d, 'model')

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dims(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def projections(self) -> tuple[adaptors.Projection, ...]:
    """The adaptable projections of one block, for target selection (A/F presets, globs).

    Names follow each architecture's own (GPT-2's fused c_attn is split into q/k/v_proj).
    """
    P = adaptors.Projection
    out, up, down = PROJECTION_NAMES[self.arch]
    attn = (P('attn/q_proj', 'A'), P('attn/k_proj', 'A', 'out'), P('attn/v_proj', 'A', 'out'),
            P(f'attn/{out}', 'A'))
    if self.arch != 'llama':
      mlp = (P(f'mlp/{up}', 'F'),)
    elif self.fused_gate_up:
      mlp = (P('mlp/gate_up_proj', 'F'),)
    else:
      mlp = (P('mlp/gate_proj', 'F'), P('mlp/up_proj', 'F'))
    return attn + mlp + (P(f'mlp/{down}', 'F', 'in'),)


# Per architecture: the attention output projection, the MLP's up and down projections.
PROJECTION_NAMES = {'llama': ('o_proj', 'up_proj', 'down_proj'),
                    'gpt2': ('c_proj', 'c_fc', 'c_proj'),
                    'opt': ('out_proj', 'fc1', 'fc2')}


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
  """Grouped-query causal self-attention, with rotary embeddings when given cos and sin.

  Llama: q/k/v biases per cfg.qkv_bias, none on o_proj. The learned-position decoders (GPT-2,
  OPT) have biases everywhere and name the output projection differently.
  """

  @nn.compact
  def __call__(self, x_BLD, routing, mask, cos, sin, kv=None, index=None):
    """Without `kv`, causal attention within x (mask: [B,1,1,L] padding or None).

    With kv = this layer's cached (keys, values) [B, G, M, K], the new keys and values are
    written at slot `index` and the queries attend over the cache (mask: [B,1,L,M], causal and
    padding already folded in); returns (out, updated kv).
    """
    cfg = self.cfg
    B, L, _ = x_BLD.shape
    H, G, K = cfg.num_heads, cfg.kv_heads, cfg.dims
    out_name = PROJECTION_NAMES[cfg.arch][0]
    bias = cfg.arch != 'llama'
    q = self.dense('q_proj', H * K, bias or cfg.qkv_bias)(x_BLD, routing).reshape(B, L, H, K)
    k = self.dense('k_proj', G * K, bias or cfg.qkv_bias)(x_BLD, routing).reshape(B, L, G, K)
    v = self.dense('v_proj', G * K, bias or cfg.qkv_bias)(x_BLD, routing).reshape(B, L, G, K)
    if cos is not None:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
      if self.is_mutable_collection(INTERMEDIATES):  # for attention heatmaps only
        self.sow(INTERMEDIATES, 'attention_probs', attention_probs(q, k, mask))
    else:
      key_BGMK, value_BGMK = kv
      write = lambda cache, new_BLGK: jax.lax.dynamic_update_slice_in_dim(
          cache, new_BLGK.transpose(0, 2, 1, 3).astype(cache.dtype), index, 2)
      kv = (write(key_BGMK, k), write(value_BGMK, v))
      out = cached_attention(q, *kv, mask)
    return self.dense(out_name, cfg.hidden_size, bias)(out.reshape(B, L, H * K), routing), kv


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


class DenseMlp(_Sub):
  """GPT-2/OPT feed-forward: down(act(up(x))), with biases; names from PROJECTION_NAMES."""

  @nn.compact
  def __call__(self, x_BLD, routing):
    cfg = self.cfg
    _, up, down = PROJECTION_NAMES[cfg.arch]
    h = ACTIVATIONS[cfg.activation](self.dense(up, cfg.intermediate_size, True)(x_BLD, routing))
    return self.dense(down, cfg.hidden_size, True)(h, routing)


class Head(nn.Module):
  """The untied LM head (params `kernel` [D, V], as nn.Dense): float32 logits straight from the
  accumulator of a compute-dtype matmul (adaptors.matmul_f32), which the loss wants anyway."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    kernel = self.param('kernel', nn.initializers.normal(0.02), (x_BLD.shape[-1], self.features),
                        self.param_dtype)
    return adaptors.matmul_f32(x_BLD.astype(self.dtype), kernel)


def make_norm(cfg: DecoderConfig, name: str | None = None) -> nn.Module:
  """Llama's RMSNorm, or the LayerNorm (scale, bias) of GPT-2 and OPT."""
  if cfg.arch == 'llama':
    return RMSNorm(cfg.rms_norm_eps, DTYPES[cfg.param_dtype], name=name)
  return nn.LayerNorm(cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype],
                      param_dtype=DTYPES[cfg.param_dtype], name=name)


class Block(nn.Module):
  """One decoder layer, shaped for nn.scan: (x, shared, kv) -> (x, kv).

  kv is this layer's slice of a `KVCache` (keys, values), or None without a cache.
  Pre-norm (x + f(norm(x))) unless cfg.pre_norm is False (OPT-350m: norm(x + f(x))).
  Subclasses name the two norms (`norm_names`) as their checkpoints do.
  """
  cfg: DecoderConfig
  peft: PeftConfig | None
  targets: tuple[tuple[str, adaptors.LayerAdaptor], ...]
  deterministic: bool = True
  norm_names = ('input_layernorm', 'post_attention_layernorm')

  @nn.compact
  def __call__(self, x_BLD, shared, kv=None):
    routing, mask, cos, sin, index = shared
    cfg = self.cfg
    sub = dict(cfg=cfg, peft=self.peft, targets=self.targets, deterministic=self.deterministic)
    drop = nn.Dropout(cfg.residual_dropout, deterministic=self.deterministic)
    norm1, norm2 = (make_norm(cfg, n) for n in self.norm_names)
    pre = (lambda norm, x: norm(x)) if cfg.pre_norm else (lambda norm, x: x)
    post = (lambda norm, x: x) if cfg.pre_norm else (lambda norm, x: norm(x))
    h, kv = Attention(**sub, name='attn')(pre(norm1, x_BLD), routing, mask, cos, sin, kv, index)
    x_BLD = post(norm1, x_BLD + drop(h))
    mlp = Mlp if cfg.arch == 'llama' else DenseMlp
    h = mlp(**sub, name='mlp')(pre(norm2, x_BLD), routing)
    return post(norm2, x_BLD + drop(h)), kv


# A layer loop reads frozen 16-bit weights as same-width integers. XLA:CPU widens a loop's
# bf16/fp16 slices to float32 and hoists that convert out of the loop, so the whole stack of
# frozen weights gained a float32 copy (bench/: paper shape, bf16 base with remat, 453 MiB of a
# LoRA step's 1717). A bitcast costs nothing and integers are sliced as they are.
_BITS = {np.dtype(jnp.bfloat16): np.dtype(np.uint16), np.dtype(np.float16): np.dtype(np.int16)}
_FLOATS = {bits: float_ for float_, bits in _BITS.items()}


@jax.custom_jvp
def _as_bits(x):
  return jax.lax.bitcast_convert_type(x, _BITS[x.dtype]) if x.dtype in _BITS else x


@_as_bits.defjvp
def _as_bits_jvp(primals, tangents):
  (x,), (t,) = primals, tangents  # only called for a differentiated weight
  if x.dtype not in _BITS:
    return x, t
  raise ValueError(f'A {x.dtype} decoder weight of shape {x.shape} is being trained in a layer '
                   'loop, which reads 16-bit weights as integers (they are meant to be frozen '
                   'there); train float32 weights (param_dtype=float32) or set '
                   'DecoderConfig.unroll_layers=True.')


def _from_bits(x):
  return jax.lax.bitcast_convert_type(x, _FLOATS[x.dtype]) if x.dtype in _FLOATS else x


class Decoder(nn.Module):
  """Token ids or input embeddings plus context ids in, logits out.

  Variables: 'params' (the frozen base; embed_tokens, layers, norm, lm_head) and 'adaptors'
  (the per-context tables, each with a leading layer axis). Subclasses (gpt2.py, opt.py) add
  learned positions through `setup` and `add_positions`, and set `arch` and `block`.
  """
  cfg: DecoderConfig
  peft: PeftConfig | None = None
  deterministic: bool = True
  arch = 'llama'
  block = Block

  def setup(self):
    cfg = self.cfg
    if cfg.arch != self.arch:
      raise ValueError(f'{type(self).__module__}.{type(self).__name__} builds arch '
                       f'{self.arch!r}, but the config has arch={cfg.arch!r}; build decoders '
                       'with cpeft_jax.models.decoders.make_decoder(cfg, peft).')
    targets = adaptors.resolve_targets(self.peft, cfg.projections())
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.embed_width,
                                 embedding_init=nn.initializers.normal(0.02),
                                 param_dtype=DTYPES[cfg.param_dtype])
    block = self.block
    unroll = (cfg.unroll_layers if cfg.unroll_layers is not None
              else cfg.dtype != 'float32' and not cfg.remat)
    in_loop = not unroll and not self.is_initializing()
    if in_loop:  # (inside remat: its residuals are then the loop's integer slices)
      block = nn.map_variables(block, 'params', lambda t: jax.tree.map(_from_bits, t))
    if cfg.remat:  # outside a loop, XLA could merge the recomputation with the forward pass
      block = nn.remat(block, prevent_cse=unroll)
    layers = nn.scan(
        block, variable_axes={'params': 0, adaptors.ADAPTORS: 0, INTERMEDIATES: 0},
        split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast, 0),
        length=cfg.num_layers, unroll=cfg.num_layers if unroll else 1)
    if in_loop:
      layers = nn.map_variables(layers, 'params', lambda t: jax.tree.map(_as_bits, t))
    self.layers = layers(cfg, self.peft, tuple(sorted(targets.items())), self.deterministic)
    self.norm = make_norm(cfg) if cfg.pre_norm else None
    if not cfg.tie_embeddings:
      self.lm_head = Head(cfg.vocab_size, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype])

  @property
  def num_contexts(self) -> int:
    return self.peft.num_contexts if self.peft is not None else 1

  def embed(self, tokens_BL):
    """Input embeddings of token ids, in the compute dtype (to splice image embeddings into)."""
    return self.embed_tokens(tokens_BL).astype(DTYPES[self.cfg.dtype])

  def add_positions(self, x_BLD, positions_BL):
    """Position information added to the input embeddings (none: Llama rotates q and k)."""
    del positions_BL
    return x_BLD

  def rope(self, positions_BL):
    """cos, sin tables for the attention, or (None, None) without rotary embeddings."""
    return rope_tables(positions_BL, self.cfg) if self.cfg.arch == 'llama' else (None, None)

  def __call__(self, tokens_BL=None, *, embeddings_BLD=None, context_ids_BL=None,
               attention_mask_BL=None, positions_BL=None, return_hidden=False, cache=None,
               logits_to_keep=0):
    """Logits [B, L, vocab] in float32 (or the final hidden states with return_hidden).

    With a `KVCache`, the L positions are the next ones after those cached (slots index ..
    index+L-1; default positions likewise) and the call returns (logits, updated cache).
    logits_to_keep=k > 0 returns only the last k positions' logits (as transformers' argument
    of that name): a prompt's prefill needs the last one, and the LM head over every position
    would cost more than the rest of the prefill.
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
    self._check_positions(L if cache is None else cache.max_len, positions_BL)
    routing = (adaptors.route(context_ids_BL, self.peft)
               if self.peft is not None and self.peft.methods else None)
    if cache is not None:
      return self._cached(x_BLD, routing, attention_mask_BL, positions_BL, return_hidden, cache,
                          logits_to_keep)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    mask_B11L = None
    if attention_mask_BL is not None:
      mask_B11L = jnp.asarray(attention_mask_BL, bool)[:, None, None, :]
    cos, sin = self.rope(positions_BL)
    x_BLD = self.add_positions(x_BLD, positions_BL)
    x_BLD, _ = self.layers(x_BLD, (routing, mask_B11L, cos, sin, None), None)
    return self._head(x_BLD, return_hidden, logits_to_keep)

  def _check_positions(self, length, positions_BL):
    """A learned position table has max_positions rows: refuse what would read past it."""
    if self.cfg.arch == 'llama':
      return
    limit = self.cfg.max_positions
    top = length - 1
    if positions_BL is not None and not isinstance(positions_BL, jax.core.Tracer):
      top = int(np.max(np.asarray(positions_BL), initial=0))
    if top >= limit:
      raise ValueError(f'Position {top} is beyond the {limit} learned positions of this '
                       f'{self.cfg.arch} decoder (model.max_positions={limit}); shorten the '
                       'sequence (or the cache).')

  def _cached(self, x_BLD, routing, attention_mask_BL, positions_BL, return_hidden, cache,
              logits_to_keep=0):
    cfg = self.cfg
    B, L = x_BLD.shape[:2]
    M = cache.max_len
    cache = cache.stacked()
    if cache.valid_BM.shape[0] != B or cache.key_NBGMK.shape[0] != cfg.num_layers:
      raise ValueError(f'The cache holds {cache.valid_BM.shape[0]} rows of '
                       f'{cache.key_NBGMK.shape[0]} layers; expected {B} rows (the batch) of '
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
    cos, sin = self.rope(positions_BL)
    x_BLD = self.add_positions(x_BLD, positions_BL)
    x_BLD, (key, value) = self.layers(x_BLD, (routing, mask_B1LM, cos, sin, index),
                                      (cache.key_NBGMK, cache.value_NBGMK))
    cache = KVCache(key, value, valid_BM, index + L)
    return self._head(x_BLD, return_hidden, logits_to_keep), cache

  def final_hidden(self, x_BLD):
    """The last layer's output as the LM head reads it (final norm; OPT may project out)."""
    return x_BLD if self.norm is None else self.norm(x_BLD)

  def _head(self, x_BLD, return_hidden, logits_to_keep=0):
    if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
      raise ValueError(f'logits_to_keep must be an int >= 0 (0: every position), got '
                       f'{logits_to_keep!r}.')
    if logits_to_keep:
      x_BLD = x_BLD[:, -logits_to_keep:]
    x_BLD = self.final_hidden(x_BLD)
    if return_hidden:
      return x_BLD
    if self.cfg.tie_embeddings:
      logits = adaptors.matmul_f32(x_BLD, self.embed_tokens.embedding.astype(x_BLD.dtype).T)
    else:
      logits = self.lm_head(x_BLD)
    return logits.astype(jnp.float32)
