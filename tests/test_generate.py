"""Generation with the KV cache against the non-cached model: logits, greedy, beam search, EOS.

The reference re-runs the full non-cached forward on the sequence generated so far. It runs on
a fixed-length buffer (prompt + max_new_tokens) so it compiles once: attention is causal, so
the logits at a position do not depend on the buffer's later slots.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpeft_jax import lowp
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.contexts import Kind
from cpeft_jax.data import layout
from cpeft_jax.evaluation import generate as gen
from cpeft_jax.models.attention import KVCache
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.llama import Decoder
from cpeft_jax.models.vlm import VisionLanguageModel
from helpers import PatchEncoder  # the shared stand-in encoder

DEC = DecoderConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, rope_theta=500.0)
PEFT = PeftConfig(methods=('lora', 'bitfit'), num_contexts=2, lora=LoraConfig(rank=2, alpha=2.0))
N, T, TEXT = 4, 6, 0  # image tokens, new tokens, the text context under 'modality'
PAD = 0


def _randomize(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), tree)


@pytest.fixture(scope='module')
def vlm():
  """A VLM with context-specific LoRA + BitFit, tables random so the contexts differ."""
  b = layout.layout_captions([[5, 6, 7], [8, 9], [10, 11, 12, 13]], num_image_tokens=N,
                             seq_len=12, bos_id=1, eos_id=2, pad_id=PAD, context_map='modality')
  b['pixels'] = np.asarray(jax.random.uniform(jax.random.key(3), (3, 16, 16, 3)))
  model = VisionLanguageModel(PatchEncoder(), DEC, PEFT)
  v = jax.jit(model.init)(jax.random.key(0), b['pixels'], b['tokens'], b['kinds'],
                          b['context_ids'])
  v = {'params': v['params'], 'adaptors': _randomize(v['adaptors'], 1)}
  P = gen.prompt_length(b['kinds'])
  assert P == 1 + N

  @jax.jit
  def forward(v, gen_BT, text_context):
    """Non-cached logits [B, T, V]: step t's prediction after gen_BT[:, :t]."""
    tokens = jnp.concatenate([jnp.asarray(b['tokens'][:, :P]), gen_BT], 1)
    kinds = jnp.concatenate([jnp.asarray(b['kinds'][:, :P]), jnp.full_like(gen_BT, Kind.TEXT)], 1)
    ctx = jnp.concatenate([jnp.asarray(b['context_ids'][:, :P]),
                           jnp.full_like(gen_BT, text_context)], 1)
    return model.apply(v, b['pixels'], tokens, kinds, ctx)[:, P - 1:-1]
  return model, v, b, lambda g, c=TEXT: np.asarray(forward(v, jnp.asarray(g, jnp.int32), c))


@pytest.fixture(scope='module')
def text_lm():
  """A plain decoder (no adaptors) and two prompts, the second left-padded."""
  cfg = dataclasses.replace(DEC, qkv_bias=True, tie_embeddings=True)
  model = Decoder(cfg)
  tokens = np.asarray([[3, 4, 5, 6, 7], [0, 0, 8, 9, 10]], np.int32)
  mask = tokens != 0
  v = jax.jit(model.init)(jax.random.key(0), tokens)
  v = {'params': _randomize(v['params'], 2)}
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)

  @jax.jit
  def forward(gen_BT):
    toks = jnp.concatenate([tokens, gen_BT], 1)
    full_mask = jnp.concatenate([mask, jnp.ones(gen_BT.shape, bool)], 1)
    pos = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(T)], 1)
    return model.apply(v, toks, attention_mask_BL=full_mask, positions_BL=pos)[:, 4:-1]
  return model, v, tokens, mask, lambda g: np.asarray(forward(jnp.asarray(g, jnp.int32)))


def _reference_greedy(forward, B, eos_id):
  out = np.full((B, T), PAD, np.int32)
  done = np.zeros(B, bool)
  for t in range(T):
    tok = np.where(done, PAD, forward(out)[:, t].argmax(-1))
    out[:, t] = tok
    done |= tok == eos_id
  return out


def _total_logprob(forward, seq_BT, eos_id):
  """Sum of log p over each row's generated tokens, up to and including its EOS."""
  logp = np.asarray(jax.nn.log_softmax(forward(seq_BT), -1))
  out = []
  for r, seq in enumerate(seq_BT):
    n = list(seq).index(eos_id) + 1 if eos_id in seq else T
    out.append(sum(logp[r, t, seq[t]] for t in range(n)))
  return np.asarray(out)


def _first_token_of(forward, B):
  """A token that free-running greedy emits in step 2 of row 0: an EOS id that really occurs."""
  return int(_reference_greedy(forward, B, eos_id=-1)[0, 2])


def test_cached_logits_equal_non_cached(vlm):
  model, v, b, _ = vlm
  P, L = 1 + N, b['tokens'].shape[1]
  apply = jax.jit(model.apply)
  decode = jax.jit(lambda *a: model.apply(v, *a, method=VisionLanguageModel.decode))
  want = np.asarray(apply(v, b['pixels'], b['tokens'], b['kinds'], b['context_ids']))
  prefill, cache0 = apply(v, b['pixels'], b['tokens'][:, :P], b['kinds'][:, :P],
                          b['context_ids'][:, :P], cache=KVCache.create(DEC, 3, L))
  np.testing.assert_allclose(prefill, want[:, :P], atol=1e-5)
  # Keeping the last 2 positions' logits, the last layer computes only theirs, but writes the
  # keys and values of every position as the full prefill does.
  last2, cache2 = jax.jit(functools.partial(model.apply, logits_to_keep=2))(
      v, b['pixels'], b['tokens'][:, :P], b['kinds'][:, :P], b['context_ids'][:, :P],
      cache=KVCache.create(DEC, 3, L))
  np.testing.assert_allclose(last2, want[:, P - 2:P], atol=1e-5)
  np.testing.assert_allclose(cache2.key_NBGMK, cache0.key_NBGMK, atol=1e-6)
  np.testing.assert_allclose(cache2.value_NBGMK, cache0.value_NBGMK, atol=1e-6)
  assert int(cache2.index) == int(cache0.index) == P
  # A cache held per layer (a decoding loop's state) reads and extends as the stacked one.
  split = cache0.per_layer()
  assert len(split.key_NBGMK) == DEC.num_layers and split.key_NBGMK[0].shape == (3, 2, L, 8)
  a, cache_a = decode(b['tokens'][:, P:P + 2], b['context_ids'][:, P:P + 2], split)
  z, cache_z = decode(b['tokens'][:, P:P + 2], b['context_ids'][:, P:P + 2], cache0)
  np.testing.assert_array_equal(a, z)
  np.testing.assert_array_equal(cache_a.key_NBGMK, cache_z.key_NBGMK)
  np.testing.assert_array_equal(np.stack(split.take(np.asarray([2, 0])).value_NBGMK),
                                cache0.take(np.asarray([2, 0])).value_NBGMK)
  # Then the rest of the rows (captions, EOS, padding) fed in chunks of 1, 2 and 4 tokens.
  got, cache = [prefill], cache0
  for start, stop in ((P, P + 1), (P + 1, P + 3), (P + 3, L)):
    logits, cache = decode(b['tokens'][:, start:stop], b['context_ids'][:, start:stop], cache)
    got.append(logits)
  assert int(cache.index) == L
  np.testing.assert_allclose(np.concatenate(got, 1), want, atol=1e-5)
  # The text context changes the logits, so generation below exercises the adaptor routing.
  other, _ = decode(b['tokens'][:, P:P + 1], 1 - b['context_ids'][:, P:P + 1], cache0)
  assert np.abs(other - got[1]).max() > 1e-3


@pytest.mark.parametrize('num_layers', [1, 3])
def test_prefill_keeping_last_positions_equals_full_prefill(num_layers):
  """A prefill that keeps the last k logits (its last layer computes only those positions)
  gives the full prefill's logits there and the same cache, with the kept positions in
  different contexts (their own routing) and a single layer (no layers before the last)."""
  cfg = dataclasses.replace(DEC, num_layers=num_layers)
  model = Decoder(cfg, PEFT)
  tokens = np.asarray([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], np.int32)
  ctx = np.asarray([[0, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1]], np.int32)
  v = jax.jit(model.init)(jax.random.key(0), tokens, context_ids_BL=ctx)
  v = {'params': v['params'], 'adaptors': _randomize(v['adaptors'], 4)}
  prefill = jax.jit(model.apply, static_argnames='logits_to_keep')
  full, cache = prefill(v, tokens, context_ids_BL=ctx, cache=KVCache.create(cfg, 2, 9))
  for k in (1, 3):
    kept, kept_cache = prefill(v, tokens, context_ids_BL=ctx, cache=KVCache.create(cfg, 2, 9),
                               logits_to_keep=k)
    assert kept.shape == (2, k, cfg.vocab_size)
    np.testing.assert_allclose(kept, full[:, -k:], atol=1e-5)
    np.testing.assert_allclose(kept_cache.key_NBGMK, cache.key_NBGMK, atol=1e-6)
    np.testing.assert_allclose(kept_cache.value_NBGMK, cache.value_NBGMK, atol=1e-6)


@pytest.mark.parametrize('text_context', [0, 1])
def test_vlm_greedy_equals_non_cached_steps(vlm, text_context):
  model, v, b, forward = vlm
  eos_id = _first_token_of(lambda g: forward(g, text_context), 3)
  got = gen.generate(model, v, b, max_new_tokens=T, eos_id=eos_id, text_context=text_context)
  want = _reference_greedy(lambda g: forward(g, text_context), 3, eos_id)
  np.testing.assert_array_equal(got, want)
  first = list(want[0]).index(eos_id)  # EOS occurs in row 0 by construction and stops it
  assert first < T - 1 and np.all(want[0, first + 1:] == PAD)


def test_eos_stops_each_row_and_pads_after(vlm):
  model, v, b, forward = vlm
  free = np.asarray(gen.generate(model, v, b, max_new_tokens=T, eos_id=DEC.vocab_size - 1,
                                 text_context=TEXT, pad_id=PAD))
  eos_id = int(free[1, 1])  # ends row 1 after two tokens; other rows wherever it occurs
  got = np.asarray(gen.generate(model, v, b, max_new_tokens=T, eos_id=eos_id,
                                text_context=TEXT, pad_id=PAD))
  want = free.copy()
  for r in range(3):
    hits = np.flatnonzero(free[r] == eos_id)
    if hits.size:
      want[r, hits[0] + 1:] = PAD
  np.testing.assert_array_equal(got, want)
  assert got[1, 1] == eos_id and np.all(got[1, 2:] == PAD)


def test_text_cached_logits_skip_left_padding(text_lm):
  model, v, tokens, mask, forward = text_lm
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  cont = np.asarray([[11, 12, 13], [14, 15, 16]], np.int32)
  apply = jax.jit(model.apply)
  prefill, cache = apply(v, tokens, attention_mask_BL=mask, positions_BL=positions,
                         cache=KVCache.create(model.cfg, 2, 8))
  steps, _ = apply(v, cont, positions_BL=positions[:, -1:] + 1 + np.arange(3), cache=cache)
  want = forward(np.pad(cont, ((0, 0), (0, T - 3))))  # positions 4 .. 4+T-1 of the buffer
  np.testing.assert_allclose(prefill[mask], apply(v, tokens, attention_mask_BL=mask,
                                                  positions_BL=positions)[mask], atol=1e-5)
  np.testing.assert_allclose(prefill[:, -1], want[:, 0], atol=1e-5)
  np.testing.assert_allclose(steps, want[:, 1:4], atol=1e-5)


def test_text_greedy_equals_non_cached_steps(text_lm):
  model, v, tokens, mask, forward = text_lm
  eos_id = _first_token_of(forward, 2)
  got = gen.generate_text(model, v, tokens, attention_mask_BP=mask, max_new_tokens=T,
                          eos_id=eos_id, text_context=0)
  np.testing.assert_array_equal(got, _reference_greedy(forward, 2, eos_id))


def test_beam_width_one_is_greedy(vlm):
  model, v, b, forward = vlm
  eos_id = _first_token_of(forward, 3)
  greedy = gen.generate(model, v, b, max_new_tokens=T, eos_id=eos_id, text_context=TEXT)
  # generate(num_beams=1) is greedy by dispatch, so this runs the beam search with one beam.
  P = gen.prompt_length(b['kinds'])

  def decode(tok_B, pos_B, cache):
    out, cache = model.apply(v, tok_B[:, None], jnp.zeros_like(tok_B)[:, None], cache,
                             pos_B[:, None], method=VisionLanguageModel.decode)
    return out[:, 0], cache

  @jax.jit
  def one_beam():
    logits, cache = model.apply(v, b['pixels'], b['tokens'][:, :P], b['kinds'][:, :P],
                                b['context_ids'][:, :P], cache=KVCache.create(DEC, 3, P + T - 1))
    return gen._beam(decode, logits[:, -1], cache, jnp.full((3,), P), T, eos_id, PAD, 1, 0.0)
  np.testing.assert_array_equal(one_beam(), greedy)


def _reference_beam(forward, B, K, eos_id, alpha):
  """Beam search in Python over the non-cached model, one row at a time."""
  out = np.full((B, T), PAD, np.int32)
  for r in range(B):
    alive = [((), 0.0)]
    best, best_score = None, -math.inf
    for t in range(T):
      buf = np.full((B, T), PAD, np.int32)
      cands = []
      for seq, score in alive:
        buf[r, :t] = seq
        logp = np.asarray(jax.nn.log_softmax(forward(buf)[r, t]))
        cands += [(score + float(logp[tok]), seq + (tok,)) for tok in range(len(logp))]
      top = sorted(cands, key=lambda c: -c[0])[:2 * K]
      for rank, (score, seq) in enumerate(top):
        if seq[-1] == eos_id and rank < K and score / (t + 1) ** alpha > best_score:
          best, best_score = seq, score / (t + 1) ** alpha
      alive = [(seq, score) for score, seq in top if seq[-1] != eos_id][:K]
      a = alive[0][1]
      if best_score >= max(a / (t + 1) ** alpha, a / T ** alpha):
        break
    else:
      best = alive[0][0]
    out[r, :len(best)] = best
  return out


@pytest.mark.parametrize('alpha,eos', [(0.0, 'occurs'), (1.0, 'occurs'), (1.0, 'rare')])
def test_beam_search_equals_python_reference(vlm, alpha, eos):
  """'rare': an EOS the model does not emit here, so the beams run (and reorder) to the end."""
  model, v, b, forward = vlm
  eos_id = _first_token_of(forward, 3) if eos == 'occurs' else DEC.vocab_size - 1
  got = gen.generate(model, v, b, max_new_tokens=T, eos_id=eos_id, text_context=TEXT,
                     num_beams=3, length_penalty=alpha)
  np.testing.assert_array_equal(got, _reference_beam(forward, 3, 3, eos_id, alpha))


def test_beam_search_scores_at_least_greedy(vlm, text_lm):
  model, v, b, forward = vlm
  eos_id = _first_token_of(forward, 3)
  kw = dict(max_new_tokens=T, eos_id=eos_id, text_context=TEXT)
  greedy = np.asarray(gen.generate(model, v, b, **kw))
  beam = np.asarray(gen.generate(model, v, b, num_beams=3, length_penalty=0.0, **kw))
  g, s = _total_logprob(forward, greedy, eos_id), _total_logprob(forward, beam, eos_id)
  assert np.all(s >= g - 1e-5), (s, g)
  assert np.any(s > g + 1e-3), 'beam search never improves on greedy here; pick another seed'
  # The decoder-only path with left padding, too.
  model, v, tokens, mask, forward = text_lm
  eos_id = _first_token_of(forward, 2)
  kw = dict(attention_mask_BP=mask, max_new_tokens=T, eos_id=eos_id, text_context=0)
  greedy = np.asarray(gen.generate_text(model, v, tokens, **kw))
  beam = np.asarray(gen.generate_text(model, v, tokens, num_beams=3, length_penalty=0.0, **kw))
  assert np.all(_total_logprob(forward, beam, eos_id) >= _total_logprob(forward, greedy, eos_id)
                - 1e-5)


def test_bad_arguments_name_the_value(vlm, text_lm):
  model, v, b, _ = vlm
  with pytest.raises(ValueError, match='text_context=2 is not a context'):
    gen.generate(model, v, b, max_new_tokens=T, eos_id=2, text_context=2)
  with pytest.raises(ValueError, match='max_new_tokens must be a positive int'):
    gen.generate(model, v, b, max_new_tokens=0, eos_id=2, text_context=0)
  kinds = b['kinds'].copy()
  kinds[0, 1] = Kind.TEXT
  with pytest.raises(ValueError, match=r'prompt .* lengths \[1, 5\]'):
    gen.generate(model, v, dict(b, kinds=kinds), max_new_tokens=T, eos_id=2, text_context=0)
  model, v, tokens, mask, _ = text_lm
  with pytest.raises(ValueError, match='pad on the left only'):
    gen.generate_text(model, v, tokens, attention_mask_BP=mask[:, ::-1], max_new_tokens=T,
                      eos_id=2, text_context=0)
  with pytest.raises(ValueError, match='logits_to_keep must be an int >= 0'):
    model.apply(v, tokens, logits_to_keep=-1)


def test_prepared_weights_are_output_major_and_generate_alike(vlm):
  """`prepare` cuts the layer stacks into per-layer kernels stored output-major (their bytes are
  the transpose), the untied head too; generation from them equals generation from the
  variables (which the tests above check against the non-cached model)."""
  model, v, b, _ = vlm
  w = gen.prepare(model, v)
  stacked = v['params']['decoder']['layers']
  for i, layer in enumerate(w.layers['params']):
    for sub, proj in (('attn', 'q_proj'), ('attn', 'o_proj'), ('mlp', 'down_proj')):
      kernel = layer[sub][proj]['kernel']
      assert isinstance(kernel, lowp.OutputMajorKernel) and kernel.shape == stacked[sub][proj][
          'kernel'].shape[1:]
      np.testing.assert_array_equal(kernel.transposed(), stacked[sub][proj]['kernel'][i].T)
  head = w.variables['params']['decoder']['lm_head']['kernel']
  np.testing.assert_array_equal(head.transposed(), v['params']['decoder']['lm_head']['kernel'].T)
  assert w.variables['params']['decoder']['layers'] is None
  np.testing.assert_array_equal(len(w.layers['adaptors']), DEC.num_layers)
  kw = dict(max_new_tokens=T, eos_id=DEC.vocab_size - 1, text_context=TEXT)
  np.testing.assert_array_equal(gen.generate(model, w, b, **kw), gen.generate(model, v, b, **kw))
  beam = dict(kw, num_beams=2)
  np.testing.assert_array_equal(gen.generate(model, w, b, **beam),
                                gen.generate(model, v, b, **beam))
  assert gen.prepare(model, w) is w


def test_prepared_bf16_weights_generate_as_the_variables(text_lm):
  """Frozen weights stored in bf16 (as PEFT runs keep them), untied head: the prepared
  (output-major) kernels, the head's float32 logits included, give the same tokens."""
  _, _, tokens, mask, _ = text_lm
  model = Decoder(dataclasses.replace(DEC, dtype='bfloat16', param_dtype='bfloat16'))
  v = jax.jit(model.init)(jax.random.key(1), tokens)
  assert {x.dtype for x in jax.tree.leaves(v)} == {jnp.dtype(jnp.bfloat16)}
  w = gen.prepare(model, v)
  assert isinstance(w.variables['params']['lm_head']['kernel'], lowp.OutputMajorKernel)
  kw = dict(attention_mask_BP=mask, max_new_tokens=T, eos_id=DEC.vocab_size - 1, text_context=0)
  np.testing.assert_array_equal(gen.generate_text(model, w, tokens, **kw),
                                gen.generate_text(model, v, tokens, **kw))


def test_argmax_is_jnp_argmax_with_ties_nans_and_infinities():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, (40, 30)).astype(np.float32)  # many ties
  x[3, [4, 9]] = np.nan
  x[5] = -np.inf
  x[6, [2, 7]] = np.inf
  for a in (x, x.astype(jnp.bfloat16), rng.standard_normal((2, 3, 50)).astype(np.float32)):
    got = jax.jit(gen.argmax)(a)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(a, -1))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('rows', [5, lowp.FEW_ROWS // 3 + 1])  # x3: a step's few, a prompt's many
def test_output_major_kernel_multiplies_as_the_kernel(dtype, rows):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((2, 24, 40)), jnp.float32)  # a stack of two
  x = jnp.asarray(rng.standard_normal((3, rows, 24)), dtype)
  om = lowp.OutputMajorKernel.of(w)
  assert om.shape == w.shape and om.astype(dtype).dtype == dtype
  for i in range(2):
    got = x @ lowp.OutputMajorKernel(om.data[i]).astype(dtype)
    want = lowp.matmul(x, w[i].astype(dtype))
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-5 if dtype == jnp.float32 else 1e-2, atol=1e-5)


def test_dora_kernels_stay_as_stored(text_lm):
  """DoRA's column norms read the kernel itself, so `prepare` leaves DoRA models' kernels be."""
  model, _, tokens, mask, _ = text_lm
  peft = PeftConfig(methods=('dora',), num_contexts=1, lora=LoraConfig(rank=2, alpha=2.0))
  dora = Decoder(model.cfg, peft)
  v = jax.jit(dora.init)(jax.random.key(0), tokens)
  v = {'params': v['params'], 'adaptors': _randomize(v['adaptors'], 3)}
  w = gen.prepare(dora, v)
  assert isinstance(w.layers['params'][0]['attn']['q_proj']['kernel'], jax.Array)
  kw = dict(attention_mask_BP=mask, max_new_tokens=T, eos_id=DEC.vocab_size - 1, text_context=0)
  np.testing.assert_array_equal(gen.generate_text(dora, w, tokens, **kw),
                                gen.generate_text(dora, v, tokens, **kw))
