"""The Llama decoder and the stack every decoder shares: block, layer scan, forward pass.

RMSNorm, rotary position embeddings with a configurable base, SwiGLU (optionally with a fused
gate+up projection, as the paper's LLM), grouped-query attention, optional q/k/v biases (Qwen2),
tied or untied embeddings, causal attention with a padding mask. Every projection is a
context-indexed `ContextDense`. The layers run under `nn.scan`, so every parameter and adaptor
table carries a leading layer axis. The decoder takes token ids or input embeddings (image
embeddings are spliced in by the caller) plus context ids, and a `KVCache` (attention.py) for
incremental calls.

One mechanism dispatches between architectures: subclassing. `Block` and `Decoder` hold
Llama's choices as class attributes and hook methods (norms, attention biases, MLP, rotary or
learned positions); gpt2.py and opt.py override those hooks, and no module branches on cfg.arch
(`Decoder.setup` only compares it with the class's `arch`). Subclasses rather than arch
branches: each architecture's differences then read in its own short file, and a decoder class
refuses a config of another architecture, so nobody builds the wrong one by accident;
`decoders.make_decoder(cfg)` picks the class. What a config alone must know (validation,
projection names for target selection) stays in decoder_config.py, keyed by architecture.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import adaptors
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models.attention import (INTERMEDIATES, Attention, KVCache, SubLayer,
                                        recomputed, rope_tables)
from cpeft_jax.models.decoder_config import DTYPES, DecoderConfig
from cpeft_jax.models.lm_head import LMHead


class RMSNorm(nn.Module):
  """x / rms(x) * weight, normalised in float32 (as transformers' LlamaRMSNorm)."""
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param('weight', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return _rms_norm(w, x, self.eps)


@functools.partial(recomputed, static_argnums=2)
def _rms_norm(w, x, eps):
  """Normalised in float32, recomputed in the backward pass, which so keeps x (compute dtype)
  rather than its float32 copy (bench/: paper shape, bf16 Context-LoRA C=2 at 2 x 1024, 35 MiB
  less XLA memory)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return w.astype(x.dtype) * x32.astype(x.dtype)


# The MLP activation's intermediates, recomputed (bench/: paper shape, bf16 LoRA step, 141 MiB
# less XLA memory at the same step time; float32 in the layer loop, 429 MiB less).
@recomputed
def swiglu(gate, up):
  return nn.silu(gate) * up


class Mlp(SubLayer):
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
    return self.dense('down_proj', cfg.hidden_size)(swiglu(gate, up), routing)


class Head(nn.Module):
  """The untied LM head's parameter (`kernel` [D, V], as nn.Dense), as an `LMHead` in the
  compute dtype: its logits come in float32 straight from the matmul's accumulator."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> LMHead:
    kernel = self.param('kernel', nn.initializers.normal(0.02), (in_features, self.features),
                        self.param_dtype)
    return LMHead(kernel.astype(self.dtype))


def rms_norm(cfg: DecoderConfig, name: str | None = None) -> nn.Module:
  """Llama's norm (a block's `make_norm`)."""
  return RMSNorm(cfg.rms_norm_eps, DTYPES[cfg.param_dtype], name=name)


class Block(nn.Module):
  """One decoder layer, shaped for nn.scan: (x, shared, kv) -> (x, kv).

  kv is this layer's slice of a `KVCache` (keys, values), or None without a cache.
  Pre-norm (x + f(norm(x))) unless cfg.pre_norm is False (OPT-350m: norm(x + f(x))).
  Llama's choices are the class attributes below; gpt2.Block and opt.Block override them.
  """
  cfg: DecoderConfig
  peft: PeftConfig | None
  targets: tuple[tuple[str, adaptors.LayerAdaptor], ...]
  deterministic: bool = True
  norm_names = ('input_layernorm', 'post_attention_layernorm')  # as the checkpoints name them
  make_norm = staticmethod(rms_norm)  # (cfg, name) -> norm module; also the decoder's final one
  attention = Attention
  mlp = Mlp

  @nn.compact
  def __call__(self, x_BLD, shared, kv=None, kept=None):
    """kept = (n, the routing of the last n positions): with a cache, only those positions'
    output ([B, n, D]; see Attention)."""
    routing, mask, cos, sin, index = shared
    cfg = self.cfg
    sub = dict(cfg=cfg, peft=self.peft, targets=self.targets, deterministic=self.deterministic)
    drop = nn.Dropout(cfg.residual_dropout, deterministic=self.deterministic)
    norm1, norm2 = (self.make_norm(cfg, n) for n in self.norm_names)
    pre = (lambda norm, x: norm(x)) if cfg.pre_norm else (lambda norm, x: x)
    post = (lambda norm, x: x) if cfg.pre_norm else (lambda norm, x: norm(x))
    attn = self.attention(**sub, name='attn')
    h, kv = attn(pre(norm1, x_BLD), routing, mask, cos, sin, kv, index, kept)
    if kept is not None:
      x_BLD, routing = x_BLD[:, -kept[0]:], kept[1]
    x_BLD = post(norm1, x_BLD + drop(h))
    h = self.mlp(**sub, name='mlp')(pre(norm2, x_BLD), routing)
    return adaptors.shard_batch(post(norm2, x_BLD + drop(h))), kv


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


def _unroll_by_default(cfg: DecoderConfig) -> bool:
  """Layers unrolled where that pays: XLA:CPU computing in 16 bits without remat (see
  DecoderConfig.unroll_layers), unless the weights are split over an 'fsdp' axis of the mesh
  the step is traced under. Unrolled there, every layer's gathered weights stay live for the
  backward pass, a whole copy of the base on each device (planner, 8 CPU devices, fsdp=8, a
  1024-wide bf16 decoder: +130 MiB per layer unrolled, flat in a loop)."""
  if cfg.dtype == 'float32' or cfg.remat or jax.default_backend() != 'cpu':
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or dict(mesh.shape).get('fsdp', 1) == 1


class Decoder(nn.Module):
  """Token ids or input embeddings plus context ids in, logits out.

  Variables: 'params' (the frozen base; embed_tokens, layers, norm, lm_head) and 'adaptors'
  (the per-context tables, each with a leading layer axis). Subclasses (gpt2.py, opt.py) set
  `arch` and `block` and override the position hooks (`rope`, `add_positions`,
  `check_positions`) and `setup`.
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
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.embed_width,
                                 embedding_init=nn.initializers.normal(0.02),
                                 param_dtype=DTYPES[cfg.param_dtype])
    self.layers = self._stack(cfg.num_layers)(*self._block_args())
    self.norm = self.block.make_norm(cfg) if cfg.pre_norm else None
    if not cfg.tie_embeddings:
      self.lm_head = Head(cfg.vocab_size, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype])

  def _block_args(self):
    targets = adaptors.resolve_targets(self.peft, self.cfg.projections())
    return self.cfg, self.peft, tuple(sorted(targets.items())), self.deterministic

  def _stack(self, length: int):
    """The module class of `length` blocks under nn.scan (their variables stacked)."""
    cfg, block = self.cfg, self.block
    unroll = cfg.unroll_layers if cfg.unroll_layers is not None else _unroll_by_default(cfg)
    in_loop = not unroll and not self.is_initializing()
    if in_loop:  # (inside remat: its residuals are then the loop's integer slices)
      block = nn.map_variables(block, 'params', lambda t: jax.tree.map(_from_bits, t))
    if cfg.remat:  # outside a loop, XLA could merge the recomputation with the forward pass
      block = nn.remat(block, prevent_cse=unroll)
    layers = nn.scan(
        block, variable_axes={'params': 0, adaptors.ADAPTORS: 0, INTERMEDIATES: 0},
        split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast, 0),
        length=length, unroll=length if unroll else 1)
    if in_loop:
      layers = nn.map_variables(layers, 'params', lambda t: jax.tree.map(_as_bits, t))
    return layers

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
    return rope_tables(positions_BL, self.cfg)

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
    self.check_positions(L if cache is None else cache.max_len, positions_BL)
    routing = (adaptors.route(context_ids_BL, self.peft)
               if self.peft is not None and self.peft.methods else None)
    if cache is not None:
      return self._cached(x_BLD, context_ids_BL, routing, attention_mask_BL, positions_BL,
                          return_hidden, cache, logits_to_keep)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    mask_B11L = None
    if attention_mask_BL is not None:
      mask_B11L = jnp.asarray(attention_mask_BL, bool)[:, None, None, :]
    cos, sin = self.rope(positions_BL)
    x_BLD = adaptors.shard_batch(self.add_positions(x_BLD, positions_BL))
    x_BLD, _ = self.layers(x_BLD, (routing, mask_B11L, cos, sin, None), None)
    return self._head(x_BLD, return_hidden, logits_to_keep)

  def check_positions(self, length, positions_BL):
    """Refuses positions the decoder cannot embed (none: rotary positions have no table)."""
    del length, positions_BL

  def _cached(self, x_BLD, context_ids_BL, routing, attention_mask_BL, positions_BL,
              return_hidden, cache, logits_to_keep=0):
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
    shared, kv = (routing, mask_B1LM, cos, sin, index), (cache.key_NBGMK, cache.value_NBGMK)
    if isinstance(logits_to_keep, int) and 0 < logits_to_keep < L and self.deterministic:
      kept = (logits_to_keep, None if routing is None else adaptors.route(
          context_ids_BL[:, -logits_to_keep:], self.peft))
      x_BLD, (key, value) = self._prefill_layers(x_BLD, shared, kv, kept)
    else:
      x_BLD, (key, value) = self.layers(x_BLD, shared, kv)
    cache = KVCache(key, value, valid_BM, index + L)
    return self._head(x_BLD, return_hidden, logits_to_keep), cache

  def _prefill_layers(self, x_BLD, shared, kv, kept):
    """The layers of a prompt's prefill that keeps only the last n = kept[0] positions' logits:
    all but the last layer as `self.layers`; the last one writes every position's keys and
    values but computes queries, the output projection and the MLP at those n positions only
    (bench/: paper shape, float32, batch 8 x 65 prompt tokens: 122.3 -> 113.7 GFLOP, prefill
    704 -> 660 ms, medians of 24 interleaved calls). Both run on `self.layers`' variables,
    sliced (modules of their own would have variables of their own)."""
    N = self.cfg.num_layers
    stacks = {col: tree['layers'] for col, tree in self.variables.items() if 'layers' in tree}
    take = lambda at: {col: jax.tree.map(lambda x: x[at], tree) for col, tree in stacks.items()}
    front = (kv[0][:N - 1], kv[1][:N - 1])  # empty with one layer
    if N > 1:
      x_BLD, front = self._stack(N - 1)(*self._block_args(), parent=None).apply(
          take(slice(0, N - 1)), x_BLD, shared, front)
    x_BLD, last = self.block(*self._block_args(), parent=None).apply(
        take(N - 1), x_BLD, shared, (kv[0][N - 1], kv[1][N - 1]), kept)
    return x_BLD, tuple(jnp.concatenate([f, l[None]]) for f, l in zip(front, last))

  def final_hidden(self, x_BLD):
    """The last layer's output as the LM head reads it (final norm; OPT may project out)."""
    return x_BLD if self.norm is None else self.norm(x_BLD)

  def output_head(self) -> LMHead:
    """The LM head (untied kernel, or the tied embedding table) in the compute dtype."""
    if self.cfg.tie_embeddings:
      return LMHead(self.embed_tokens.embedding.astype(DTYPES[self.cfg.dtype]), vocab_major=True)
    return self.lm_head(self.cfg.embed_width)

  def features(self, tokens_BL=None, **kwargs):
    """(final hidden states [B, L, D], `output_head()`): what the logits are made of, for a loss
    that computes them a chunk at a time (cpeft_jax/losses.py). Arguments as `__call__`'s."""
    return self(tokens_BL, return_hidden=True, **kwargs), self.output_head()

  def _head(self, x_BLD, return_hidden, logits_to_keep=0):
    if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
      raise ValueError(f'logits_to_keep must be an int >= 0 (0: every position), got '
                       f'{logits_to_keep!r}.')
    if logits_to_keep:
      x_BLD = x_BLD[:, -logits_to_keep:]
    x_BLD = self.final_hidden(x_BLD)
    if return_hidden:
      return x_BLD
    return self.output_head().logits(x_BLD)
