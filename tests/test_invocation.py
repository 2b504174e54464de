"""Invocation-triggered contexts: the id rule against a per-row loop, and reuse of a base cache.

The decoder's references are a fresh base model (a Decoder with peft=None on the same params)
for the keys/values before each row's invocation, and the non-cached adapted model, run on the
whole prompt with the invocation contexts, for greedy generation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpeft_jax import invocations as invocations_lib
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.evaluation import invocation as inv
from cpeft_jax.models.attention import KVCache
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.llama import Decoder

DEC = DecoderConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, rope_theta=500.0)
# Context 0 is the base: no adaptor rows, as an adapted_contexts list or a per-context spec.
PEFTS = {
    'adapted_contexts': PeftConfig(methods=('lora', 'ia3', 'bitfit'), num_contexts=3,
                                   adapted_contexts=(1, 2), lora=LoraConfig(rank=2, alpha=2.0)),
    'specs': PeftConfig(num_contexts=3, lora=LoraConfig(rank=2, alpha=2.0), contexts=(
        {'methods': 'none'}, {'methods': 'lora', 'rank': 4}, {'methods': 'lora+bitfit'})),
}
INVOCATIONS = {1: [3, 4], 2: [5]}
T, PAD = 5, 0


# ----------------------------------------------------------------------------- the id rule


def _reference_contexts(tokens_BL, invocations, base, valid_BL):
  """The rule, one row and one position at a time."""
  B, L = tokens_BL.shape
  out = np.full((B, L), base, np.int32)
  for b in range(B):
    current = base
    for i in range(L):
      starting = [(len(seq), ctx) for ctx, seq in invocations.items()
                  if i + len(seq) <= L and all(valid_BL[b, i + j] and tokens_BL[b, i + j] == s
                                               for j, s in enumerate(seq))]
      if starting:
        current = max(starting)[1]  # the longer sequence wins at a shared start
      out[b, i] = current if valid_BL[b, i] else base
  return out


def test_invocation_contexts_equal_per_row_loop():
  rng = np.random.default_rng(0)
  B, L = 40, 12
  invocations = {1: [4, 5], 2: [6], 3: [4, 5, 7], 5: [8, 8]}  # [4, 5] is a prefix of [4, 5, 7]
  tokens = rng.integers(3, 10, size=(B, L))
  tokens[0] = 3  # no invocation at all
  tokens[1, :3] = [6, 3, 3]  # an invocation at position 0
  tokens[2, 5:9] = [4, 5, 7, 3]  # two sequences start at 5: the longer one, context 3, wins
  pad_left = np.arange(L) >= rng.integers(0, 4, size=(B, 1))
  pad_right = np.arange(L) < L - rng.integers(0, 4, size=(B, 1))
  valid = np.where(np.arange(B)[:, None] % 2 == 0, pad_left, pad_right)
  valid[1] = True
  got = invocations_lib.invocation_contexts(tokens, invocations, 0, attention_mask_BL=valid,
                                            num_contexts=6)
  want = _reference_contexts(tokens, invocations, 0, valid)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.int32
  # The sample covers what the rule has to decide.
  assert (got[0] == 0).all() and got[1, 0] == 2
  assert got[2, 5] == 3 and (got == 5).any()
  switches = (np.diff(got, axis=1) != 0) & (got[:, :-1] != 0) & (got[:, 1:] != 0)
  assert switches.any()  # a later invocation of another sequence switched a row again
  assert (got[~valid] == 0).all()
  # Without a mask every token counts; the base context may be any unadapted id.
  np.testing.assert_array_equal(
      invocations_lib.invocation_contexts(tokens, {1: [4, 5]}, base_context=2),
      _reference_contexts(tokens, {1: [4, 5]}, 2, np.ones((B, L), bool)))


def test_reusable_prefix():
  ctx = np.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, 2]])
  assert invocations_lib.reusable_prefix(ctx) == 3
  assert invocations_lib.reusable_prefix(np.zeros((2, 5), int)) == 5
  assert invocations_lib.reusable_prefix(ctx, base_context=1) == 0


@pytest.mark.parametrize('invocations, kw, match', [
    ({1: []}, {}, r'invocation sequence of context 1 must be a non-empty 1-D sequence'),
    ({1: [2.5]}, {}, r'invocation sequence of context 1 must be a non-empty 1-D sequence'),
    ({1: [3], 2: [3]}, {}, r'contexts 1 and 2 share the invocation sequence \[3\]'),
    ({3: [3]}, {'num_contexts': 3}, r'invocation context 3 is out of range for num_contexts=3'),
    ({-1: [3]}, {}, r'invocation context id must be an int >= 0, got -1'),
    ({0: [3]}, {}, r'invocation context 0 is the base context'),
    ({}, {}, r'invocations must be a non-empty dict'),
    ({1: [3]}, {'base_context': 4, 'num_contexts': 3}, r'base_context=4 is out of range'),
])
def test_bad_invocations_are_named(invocations, kw, match):
  with pytest.raises(ValueError, match=match):
    invocations_lib.invocation_contexts(np.zeros((2, 4), np.int32), invocations, **kw)


# ----------------------------------------------------------------------------- the decoder


def _randomize(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), tree)


# Row 0 invokes context 1 at position 3, row 1 context 2 at 6 (then 1 at 8), row 2 has no
# invocation, row 3 is left-padded past the batch's earliest invocation and invokes 2 at 7.
TOKENS = np.array([[11, 12, 13, 3, 4, 14, 15, 16, 17, 18],
                   [21, 22, 23, 24, 25, 26, 5, 27, 3, 4],
                   [31, 32, 33, 34, 35, 36, 37, 38, 39, 30],
                   [PAD, PAD, PAD, PAD, 11, 13, 17, 5, 19, 23]], np.int32)
MASK = TOKENS != PAD
STARTS = [3, 6, 10, 7]  # first position of each row's invocation (10: none)


@pytest.fixture(scope='module', params=sorted(PEFTS))
def models(request):
  """The adapted decoder with random nonzero tables for contexts 1, 2; the plain base decoder."""
  model = Decoder(DEC, PEFTS[request.param])
  v = jax.jit(model.init)(jax.random.key(0), TOKENS)
  v = {'params': _randomize(v['params'], 1), 'adaptors': _randomize(v['adaptors'], 2)}
  return model, Decoder(DEC), v


def _positions(mask):
  return np.maximum(np.cumsum(mask, 1) - 1, 0)


def test_keys_values_before_the_invocation_are_the_base_models(models):
  model, base, v = models
  B, P = TOKENS.shape
  ctx = invocations_lib.invocation_contexts(TOKENS, INVOCATIONS, attention_mask_BL=MASK,
                                            num_contexts=3)
  assert [int(np.argmax(np.append(c, 1) != 0)) for c in ctx] == STARTS
  kw = dict(attention_mask_BL=MASK, positions_BL=_positions(MASK))
  _, adapted = jax.jit(model.apply)(v, TOKENS, context_ids_BL=ctx,
                                    cache=KVCache.create(DEC, B, P), **kw)
  _, fresh = jax.jit(base.apply)({'params': v['params']}, TOKENS,
                                 cache=KVCache.create(DEC, B, P), **kw)
  # Padding slots are never read (a fully masked query's output is arbitrary): skip them.
  for r, start in enumerate(STARTS):
    before = MASK[r] & (np.arange(P) < start)
    for name in ('key_NBGMK', 'value_NBGMK'):
      a, f = _slots_last(getattr(adapted, name))[:, r], _slots_last(getattr(fresh, name))[:, r]
      np.testing.assert_allclose(a[:, before], f[:, before], atol=1e-6, rtol=0)
      diff_M = np.abs(a - f).max(axis=(0, 2, 3))
      assert (diff_M[start:] > 1e-3).all(), (r, name, diff_M)
  # The base's cache of the shared prefix, extended by the adapted model, is the same cache.
  P0 = invocations_lib.reusable_prefix(ctx)
  assert P0 == 3
  cache = inv.prefill_base(base, {'params': v['params']}, TOKENS[:, :P0], max_len=P,
                           attention_mask_BP=MASK[:, :P0])
  _, reused = jax.jit(model.apply)(v, TOKENS[:, P0:], context_ids_BL=ctx[:, P0:],
                                   attention_mask_BL=MASK[:, P0:],
                                   positions_BL=_positions(MASK)[:, P0:], cache=cache)
  np.testing.assert_array_equal(reused.valid_BM, adapted.valid_BM)
  for name in ('key_NBGMK', 'value_NBGMK'):
    np.testing.assert_allclose(_slots_last(getattr(reused, name))[:, MASK],
                               _slots_last(getattr(adapted, name))[:, MASK], atol=1e-5, rtol=0)


def _slots_last(cache_NBGMK):
  """A cache's keys or values as [layers, B, M, G, K], slots next to the batch axis."""
  return np.asarray(cache_NBGMK).transpose(0, 1, 3, 2, 4)


def _full_forward(model, v, ctx):
  """Non-cached logits of the whole prompt + a T-token buffer, generated tokens in the context
  of their row's last prompt token; the buffer's fixed length compiles once (causal attention).
  """
  B = TOKENS.shape[0]
  mask = np.concatenate([MASK, np.ones((B, T), bool)], 1)
  ctx = np.concatenate([ctx, np.repeat(ctx[:, -1:], T, 1)], 1)
  apply = jax.jit(lambda buf: model.apply(v, buf, context_ids_BL=ctx, attention_mask_BL=mask,
                                          positions_BL=_positions(mask)))
  return lambda buf: np.asarray(apply(buf))


def _reference_greedy(forward, eos_id):
  """Greedy decoding with the non-cached model, re-run on everything generated so far."""
  B, P = TOKENS.shape
  buf = np.concatenate([TOKENS, np.full((B, T), PAD, np.int32)], 1)
  done = np.zeros(B, bool)
  for t in range(T):
    tok = np.where(done, PAD, forward(buf)[:, P - 1 + t].argmax(-1))
    buf[:, P + t] = tok
    done |= tok == eos_id
  return buf[:, P:]


def test_greedy_from_base_cache_equals_full_prefill(models):
  model, base, v = models
  ctx = invocations_lib.invocation_contexts(TOKENS, INVOCATIONS, attention_mask_BL=MASK,
                                            num_contexts=3)
  forward = _full_forward(model, v, ctx)
  free = _reference_greedy(forward, eos_id=-1)
  # An EOS that ends some row r after k + 1 > 1 tokens (and other rows wherever it occurs).
  r, k = next((r, k) for r in range(len(free)) for k in range(1, T)
              if free[r, k] not in free[r, :k])
  eos_id = int(free[r, k])
  want = _reference_greedy(forward, eos_id)
  kw = dict(attention_mask_BP=MASK, max_new_tokens=T, eos_id=eos_id, pad_id=PAD)
  got = inv.generate_invoked(model, v, TOKENS, INVOCATIONS, base_model=base, **kw)
  np.testing.assert_array_equal(got, want)
  assert want[r, k] == eos_id and (want[r, k + 1:] == PAD).all()
  # The adapted model's own base context gives the same base cache.
  np.testing.assert_array_equal(inv.generate_invoked(model, v, TOKENS, INVOCATIONS, **kw), want)


@pytest.mark.parametrize('models', ['adapted_contexts'], indirect=True)
def test_bad_generation_inputs_are_named(models):
  model, base, v = models
  adapted_base = Decoder(DEC, PeftConfig(methods=('lora',), num_contexts=3))
  with pytest.raises(ValueError, match=r'base context 0 has adaptor rows'):
    inv.prefill_base(adapted_base, v, TOKENS, max_len=12)
  cache = KVCache.create(DEC, 4, 8)
  with pytest.raises(ValueError, match=r'needs max_len >= 12'):
    inv.generate_from_cache(model, v, cache, TOKENS[:, :8], np.zeros((4, 8), np.int32),
                            max_new_tokens=5, eos_id=2)
  with pytest.raises(ValueError, match=r'context_ids_BS must be ints in \[0, 3\)'):
    inv.generate_from_cache(model, v, cache, TOKENS[:, :2], np.full((4, 2), 3), max_new_tokens=2,
                            eos_id=2)
  with pytest.raises(ValueError, match=r'attention_mask_BP must have the token shape'):
    inv.prefill_base(base, v, TOKENS, max_len=12, attention_mask_BP=MASK[:, ::-1])


@pytest.mark.parametrize('models', ['specs'], indirect=True)  # beams need not run twice
def test_beam_search_rows_keep_their_own_contexts(models):
  """Batched beam search from the base cache equals each row's beam search on its own."""
  model, base, v = models
  B, P = TOKENS.shape
  ctx = invocations_lib.invocation_contexts(TOKENS, INVOCATIONS, attention_mask_BL=MASK,
                                            num_contexts=3)
  kw = dict(max_new_tokens=T, eos_id=DEC.vocab_size - 1, num_beams=3, length_penalty=1.0)
  got = inv.generate_invoked(model, v, TOKENS, INVOCATIONS, attention_mask_BP=MASK,
                             base_model=base, **kw)
  for r in range(B):  # one row, prefilled whole with its contexts into an empty cache
    alone = inv.generate_from_cache(model, v, KVCache.create(DEC, 1, P + T - 1), TOKENS[r:r + 1],
                                    ctx[r:r + 1], attention_mask_BS=MASK[r:r + 1], **kw)
    np.testing.assert_array_equal(got[r], alone[0])
