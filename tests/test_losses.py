"""The chunked cross-entropy (losses.head_token_losses) against today's full-logits path.

The reference is `token_losses(head.logits(hidden))`, whose own backward pass test_train_step.py
checks against optax: losses and gradients (hidden states, head, a train step's trainable tree)
must agree to float32 tolerance, for tied and untied heads, masked positions, quantized heads,
and chunks that do not divide the sequence. The compiled train step must hold no float32
[B, L, V] buffer, and a frozen head must get no gradient computed at all.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpeft_jax import losses, quantize, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.llama import Decoder
from cpeft_jax.models.lm_head import LMHead
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib

DEC = DecoderConfig(vocab_size=96, hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32)
PEFT = PeftConfig(methods=('lora',), num_contexts=2, lora=LoraConfig(rank=2, alpha=2.0))
B, L = 4, 10
CHUNK = B * 3 * DEC.vocab_size  # 3 positions a chunk: 4 chunks, the last with 2 padded


def _head_case(vocab_major, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  D, V = DEC.hidden_size, DEC.vocab_size
  x = jnp.asarray(rng.standard_normal((B, L, D)), dtype)
  w = jnp.asarray(rng.standard_normal((V, D) if vocab_major else (D, V)) / 4, dtype)
  t = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  mask = jnp.asarray(rng.random((B, L)) < 0.7, jnp.float32)  # masked positions: weight 0
  return x, w, t, mask


def test_chunking_covers_every_position_in_even_chunks():
  assert losses.chunking(B, L, 96, CHUNK) == (4, 3)
  assert losses.chunking(B, L, 96, 1) == (10, 1)  # at least one position a chunk
  assert losses.chunking(B, L, 96, 10**9) == (1, 10)
  assert losses.chunking(8, 128, 50272) == (13, 10)  # the paper's LLM shape
  with pytest.raises(ValueError, match='chunk_logits must be a positive'):
    losses.chunking(B, L, 96, 0)


@pytest.mark.parametrize('vocab_major', [False, True], ids=['untied', 'tied'])
@pytest.mark.parametrize('chunk', [CHUNK, 1, 10**9], ids=['4chunks', 'per-position', 'whole'])
def test_losses_and_gradients_equal_the_full_logits(vocab_major, chunk):
  x, w, t, mask = _head_case(vocab_major)
  full = lambda x, w: jnp.sum(losses.token_losses(LMHead(w, vocab_major).logits(x), t) * mask)
  ours = lambda x, w: jnp.sum(
      losses.head_token_losses(x, LMHead(w, vocab_major), t, chunk_logits=chunk) * mask)
  per_token = losses.head_token_losses(x, LMHead(w, vocab_major), t, chunk_logits=chunk)
  np.testing.assert_allclose(per_token, losses.token_losses(LMHead(w, vocab_major).logits(x), t),
                             rtol=1e-6, atol=1e-6)
  (lf, gf), (lo, go) = (jax.jit(jax.value_and_grad(f, (0, 1)))(x, w) for f in (full, ours))
  np.testing.assert_allclose(lo, lf, rtol=1e-6)
  for a, b in zip(go, gf):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Masked positions get no gradient; a frozen head (no d(head) asked) the same d(hidden).
  assert not np.any(np.asarray(go[0])[np.asarray(mask) == 0])
  np.testing.assert_allclose(jax.grad(ours)(x, w), gf[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('vocab_major', [False, True], ids=['untied', 'tied'])
def test_chunks_with_no_scored_position_skip_the_head_both_ways(vocab_major):
  """The first two chunks (positions 0-5, as a caption's image positions) are unscored in every
  row and hold NaN hidden states: given the mask, the head never reads them (a NaN would reach
  the loss's sum or d(head) otherwise, as it does without the mask); the rest equals the full
  logits' losses and gradients."""
  x, w, t, mask = _head_case(vocab_major)
  mask = mask.at[:, :6].set(0.0)
  x_nan = x.at[:, :6].set(jnp.nan)
  head = lambda w: LMHead(w, vocab_major)
  full = lambda x, w: jnp.sum(losses.token_losses(head(w).logits(x), t) * mask)
  ours = lambda x, w, m=mask: jnp.sum(
      losses.head_token_losses(x, head(w), t, mask_BL=m, chunk_logits=CHUNK) * mask)
  lf, gf = jax.value_and_grad(full, (0, 1))(x.at[:, :6].set(0.0), w)
  lo, go = jax.jit(jax.value_and_grad(ours, (0, 1)))(x_nan, w)
  np.testing.assert_allclose(lo, lf, rtol=1e-6)
  for a, b in zip(go, gf):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(go[0])[:, :6])
  # A frozen head (d(hidden) made in the forward pass) skips the same chunks.
  np.testing.assert_allclose(jax.jit(jax.grad(ours))(x_nan, w), gf[0], rtol=1e-5, atol=1e-6)
  unskipped = jax.value_and_grad(lambda x, w: ours(x, w, None), (0, 1))(x_nan, w)
  assert np.isnan(unskipped[0]) and np.isnan(np.asarray(unskipped[1][1])).any()


def test_bfloat16_head_matches_the_full_logits_to_its_rounding():
  """bf16 hidden states and head: float32 logits either way; d(hidden) rounds once to bf16 as
  the full path's, d(head) is accumulated over chunks in float32 and rounded once."""
  x, w, t, mask = _head_case(False, jnp.bfloat16)
  full = lambda x, w: jnp.sum(losses.token_losses(LMHead(w).logits(x), t) * mask)
  ours = lambda x, w: jnp.sum(losses.head_token_losses(x, LMHead(w), t, chunk_logits=CHUNK)
                              * mask)
  (lf, gf), (lo, go) = (jax.jit(jax.value_and_grad(f, (0, 1)))(x, w) for f in (full, ours))
  np.testing.assert_allclose(lo, lf, rtol=1e-6)
  frozen = jax.jit(jax.grad(ours))(x, w)  # d(hidden) alone: made in the forward pass
  for a, b in zip((*go, frozen), (*gf, gf[0])):
    assert a.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=2 ** -7 * np.abs(b).max())


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it (a loop body's once)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _equations(inner)


def _shapes(jaxpr):
  """Every (shape, dtype) an equation of `jaxpr` (or of a jaxpr inside it) outputs."""
  return {(tuple(v.aval.shape), str(v.aval.dtype)) for eqn in _equations(jaxpr)
          for v in eqn.outvars}


@pytest.mark.parametrize('vocab_major', [False, True], ids=['untied', 'tied'])
def test_a_frozen_head_gets_no_gradient_computed(vocab_major):
  """Only when the head is differentiated does the backward pass make a head-shaped array (the
  float32 d(head) accumulator and its per-chunk products)."""
  x, w, t, mask = _head_case(vocab_major)
  f = lambda x, w: jnp.sum(losses.head_token_losses(x, LMHead(w, vocab_major), t,
                                                    chunk_logits=CHUNK) * mask)
  head_shaped = (tuple(w.shape), 'float32')
  assert head_shaped not in _shapes(jax.make_jaxpr(jax.grad(f))(x, w).jaxpr)
  assert head_shaped in _shapes(jax.make_jaxpr(jax.grad(f, 1))(x, w).jaxpr)


def _products_with(jaxpr, shapes) -> int:
  """How many dot_general equations of `jaxpr` (and of the jaxprs inside it, a loop body's
  once) take an operand of one of `shapes`."""
  return sum(eqn.primitive.name == 'dot_general' and any(
      tuple(v.aval.shape) in shapes for v in eqn.invars) for eqn in _equations(jaxpr))


@pytest.mark.parametrize('vocab_major', [False, True], ids=['untied', 'tied'])
def test_a_frozen_head_is_read_twice_a_chunk_a_trainable_one_three_times(vocab_major):
  """With the head frozen, d(hidden) is made beside the logits in the forward pass, so the
  backward pass computes no logits again: two products with the head per chunk (logits and
  d(hidden)) where a trainable head needs three (logits, then logits again and d(hidden))."""
  x, w, t, mask = _head_case(vocab_major)
  f = lambda x, w: jnp.sum(losses.head_token_losses(x, LMHead(w, vocab_major), t,
                                                    chunk_logits=CHUNK) * mask)
  head = {w.shape, w.shape[::-1]}  # the tied table enters the logits as W^T
  assert _products_with(jax.make_jaxpr(jax.grad(f))(x, w).jaxpr, head) == 2
  assert _products_with(jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).jaxpr, head) == 3


# ----------------------------------------------------------------------------- train steps


def _decoder_case(mode, tie=False, dtype='float32', quant=None):
  """A tiny decoder as training nests it ('params/decoder/...'), split by `mode`, and a batch."""
  cfg = dataclasses.replace(DEC, tie_embeddings=tie, dtype=dtype)
  peft = PEFT if mode == 'peft' else None
  net = Decoder(cfg, peft, deterministic=False)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, DEC.vocab_size, (B, L + 1)).astype(np.int32)
  ctx = (np.arange(L)[None] >= 4).astype(np.int32).repeat(B, 0)
  batch = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'context_ids': ctx,
           'attention_mask': np.ones((B, L), np.int32),
           'loss_mask': (rng.random((B, L)) < 0.7).astype(np.float32)}
  v = jax.jit(net.init)(jax.random.key(0), batch['tokens'], context_ids_BL=ctx)
  v = {col: {'decoder': tree} for col, tree in v.items()}
  if 'adaptors' in v:  # LoRA's B starts at 0: random tables, so every table has a gradient
    v['adaptors'] = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape),
                                                       a.dtype), v['adaptors'])
  if quant:
    v['params'] = quantize.quantize_params(v['params'], quantize.QuantConfig(
        format='int8', granularity='channel', targets=quant))
  trainable, frozen = trainable_lib.split(v, mode, train_embeddings=True)

  def apply(features):
    def fn(variables, b, *, train=False, rng=None):
      return net.apply({c: t['decoder'] for c, t in variables.items()}, b['tokens'],
                       context_ids_BL=b['context_ids'], attention_mask_BL=b['attention_mask'],
                       method='features' if features else None)
    return fn
  return trainable, frozen, {k: jnp.asarray(a) for k, a in batch.items()}, apply


def _step_gradients(trainable, frozen, batch, apply_fn):
  """The train step's gradient (SGD at rate 1: old - new) and its metrics."""
  st = state_lib.TrainState.create(trainable, optax.sgd(1.0))
  step = jax.jit(lambda s, f, b: step_lib.train_step(s, f, b, jax.random.key(0),
                                                     apply_fn=apply_fn, num_contexts=2))
  new, m = step(st, frozen, batch)
  return jax.tree.map(jnp.subtract, trainable, new.trainable), m


@pytest.mark.parametrize('mode,tie,dtype,quant', [
    ('peft', False, 'float32', None),
    ('full', False, 'float32', None),  # the untied head trains
    ('full', True, 'float32', None),  # the tied table trains as input embeddings and head
    ('peft', False, 'float32', 'decoder,lm_head'),  # a quantized untied head
    ('peft', True, 'float32', 'embed'),  # a quantized tied table
    ('full', False, 'bfloat16', None),
], ids=['lora', 'full', 'full-tied', 'lora-qhead', 'lora-qtied', 'full-bf16'])
def test_train_step_gradients_equal_the_full_logits_path(monkeypatch, mode, tie, dtype, quant):
  monkeypatch.setattr(losses, 'CHUNK_LOGITS', CHUNK)
  trainable, frozen, batch, apply = _decoder_case(mode, tie, dtype, quant)
  g_ref, m_ref = _step_gradients(trainable, frozen, batch, apply(False))
  g, m = _step_gradients(trainable, frozen, batch, apply(True))
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == 'float32' else dict(rtol=2e-2, atol=2e-3)
  np.testing.assert_allclose(m['loss'], m_ref['loss'], rtol=1e-6 if dtype == 'float32' else 1e-3)
  np.testing.assert_allclose(m['loss_ctx'], m_ref['loss_ctx'], **tol)
  np.testing.assert_allclose(m['grad_norm'], m_ref['grad_norm'], **tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=tol['rtol'], atol=tol['atol'] * max(float(np.abs(b).max()), 1.0)), g, g_ref)
  assert all(np.abs(np.asarray(x)).max() > 0 for x in trees.flatten(g).values())
  if mode == 'full':  # the head's own gradient is among those compared
    head = 'embed_tokens' if tie else 'lm_head'
    assert head in g['params']['decoder']


def _full_logit_buffers(hlo: str, V: int) -> list[str]:
  """float32 shapes in `hlo` with a vocabulary axis and at least B x L x V elements."""
  out = []
  for dims in re.findall(r'f32\[([0-9,]+)\]', hlo):
    shape = [int(d) for d in dims.split(',')]
    if V in shape and np.prod(shape) >= B * L * V:
      out.append(dims)
  return out


@pytest.mark.parametrize('mode', ['peft', 'full'])
def test_compiled_train_step_holds_no_full_vocabulary_logits(monkeypatch, mode):
  """The optimized HLO of the jitted step: no float32 [B, L, V]-sized buffer with a vocabulary
  axis anywhere (forward or backward), where the full-logits step has them."""
  monkeypatch.setattr(losses, 'CHUNK_LOGITS', CHUNK)
  trainable, frozen, batch, apply = _decoder_case(mode)
  assert DEC.hidden_size * DEC.vocab_size < B * L * DEC.vocab_size  # the head is not counted
  st = state_lib.TrainState.create(trainable, optax.adam(1e-3))

  def hlo(apply_fn):
    step = jax.jit(lambda s, f, b: step_lib.train_step(s, f, b, jax.random.key(0),
                                                       apply_fn=apply_fn))
    return step.lower(st, frozen, batch).compile().as_text()
  assert _full_logit_buffers(hlo(apply(False)), DEC.vocab_size)  # the check can fail
  assert not _full_logit_buffers(hlo(apply(True)), DEC.vocab_size)
