"""The decoder against transformers' PyTorch Llama/Qwen2, and its context/adaptor behaviour."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpeft_jax import checkpoints
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.models import llama
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.models.llama import Decoder

CFG = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, rope_theta=500.0, rms_norm_eps=1e-5)
ALL = PeftConfig(methods=('lora', 'ia3', 'bitfit'), num_contexts=2,
                 lora=LoraConfig(rank=4, alpha=8.0))


def _tokens(shape=(2, 9), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def _randomize(tables, seed=1):
  leaves, treedef = jax.tree.flatten(tables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope='module')
def adapted():
  model = Decoder(CFG, ALL)
  tokens = _tokens()
  ctx = jnp.asarray(np.random.default_rng(5).integers(0, 2, tokens.shape), jnp.int32)
  v = model.init(jax.random.key(0), tokens, context_ids_BL=ctx)
  return model, v, tokens, ctx


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_matches_transformers_pytorch(arch):
  torch = pytest.importorskip('torch')
  import transformers
  torch.manual_seed(0)
  common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                rope_theta=500.0)
  if arch == 'llama':
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    cfg = CFG
  else:
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    cfg = dataclasses.replace(CFG, qkv_bias=True, tie_embeddings=True)
  hf.eval()
  with torch.no_grad():  # make biases and norms non-trivial so a mix-up shows
    for name, p in hf.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  tokens = _tokens()
  mask = np.ones(tokens.shape, bool)
  mask[1, 6:] = False  # right padding in the second row
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(np.asarray(tokens)),
              attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
  params, report = checkpoints.params_from_state_dict(hf.state_dict(), cfg, model_type=arch)
  assert report == checkpoints.LoadReport((), ())
  got = Decoder(cfg, ALL).apply(
      {'params': params, 'adaptors': Decoder(cfg, ALL).init(jax.random.key(0), tokens)['adaptors']},
      tokens, context_ids_BL=jnp.asarray(np.arange(18).reshape(2, 9) % 2),
      attention_mask_BL=mask)
  np.testing.assert_allclose(np.asarray(got)[mask], want[mask], atol=1e-4, rtol=1e-4)


def test_fresh_adapted_decoder_is_bit_identical_to_base(adapted):
  model, v, tokens, ctx = adapted
  base = Decoder(CFG).apply({'params': v['params']}, tokens)
  assert np.array_equal(np.asarray(model.apply(v, tokens, context_ids_BL=ctx)), np.asarray(base))


def test_fused_gate_up_equals_separate_projections(adapted):
  _, v, tokens, _ = adapted
  fused_cfg = dataclasses.replace(CFG, fused_gate_up=True)
  p = jax.tree.map(lambda x: x, v['params'])
  mlp = p['layers']['mlp']
  fused_mlp = {'gate_up_proj': {'kernel': jnp.concatenate(
      [mlp['gate_proj']['kernel'], mlp['up_proj']['kernel']], -1)}, 'down_proj': mlp['down_proj']}
  p['layers'] = dict(p['layers'], mlp=fused_mlp)
  np.testing.assert_allclose(Decoder(fused_cfg).apply({'params': p}, tokens),
                             Decoder(CFG).apply({'params': v['params']}, tokens), atol=1e-5)


def test_causal_and_embeddings_path(adapted):
  model, v, tokens, ctx = adapted
  v = {'params': v['params'], 'adaptors': _randomize(v['adaptors'])}
  out = model.apply(v, tokens, context_ids_BL=ctx)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % CFG.vocab_size)
  out2 = model.apply(v, changed, context_ids_BL=ctx)
  np.testing.assert_array_equal(out[:, :5], out2[:, :5])
  assert not np.allclose(out[:, 5:], out2[:, 5:])
  emb = model.apply(v, tokens, method=Decoder.embed)
  np.testing.assert_array_equal(model.apply(v, embeddings_BLD=emb, context_ids_BL=ctx), out)


def test_left_padding_with_positions_matches_unpadded(adapted):
  model, v, tokens, ctx = adapted
  v = {'params': v['params'], 'adaptors': _randomize(v['adaptors'])}
  short, sctx = tokens[:1, :6], ctx[:1, :6]
  want = model.apply(v, short, context_ids_BL=sctx)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], 1)
  pctx = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), sctx], 1)
  mask = jnp.arange(9)[None] >= 3
  pos = jnp.maximum(jnp.arange(9)[None] - 3, 0)
  got = model.apply(v, padded, context_ids_BL=pctx, attention_mask_BL=mask, positions_BL=pos)
  np.testing.assert_allclose(got[:, 3:], want, atol=1e-5)


def test_context_group_changes_and_gradients(adapted):
  model, v, tokens, _ = adapted
  tables = _randomize(v['adaptors'])
  ctx = jnp.zeros_like(tokens)  # only context 0 occurs

  def loss(t):
    return jnp.mean(model.apply({'params': v['params'], 'adaptors': t}, tokens,
                                context_ids_BL=ctx) ** 2)

  g = jax.grad(loss)(tables)
  for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
    assert np.all(np.asarray(leaf[:, 1]) == 0), jax.tree_util.keystr(path)
    assert np.any(np.asarray(leaf[:, 0]) != 0), jax.tree_util.keystr(path)
  # Group 1's parameters do not touch a sequence of context-0 tokens at all.
  bumped = jax.tree.map(lambda a: a.at[:, 1].add(1.0), tables)
  assert loss(bumped) == loss(tables)


def test_bad_inputs_raise(adapted):
  model, v, tokens, _ = adapted
  with pytest.raises(ValueError, match=r'num_contexts=2 \(valid ids are 0..1\)'):
    model.apply(v, tokens, context_ids_BL=jnp.full(tokens.shape, 2))
  with pytest.raises(ValueError, match='expected the token shape'):
    model.apply(v, tokens, context_ids_BL=jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match='model.num_heads=4 must be a multiple'):
    dataclasses.replace(CFG, num_kv_heads=3)
  with pytest.raises(ValueError, match="matches no projection"):
    Decoder(CFG, PeftConfig(methods=('lora',), targets='query')).init(jax.random.key(0), tokens)


def test_bf16_compute_is_close_to_fp32(adapted):
  model, v, tokens, ctx = adapted
  v = {'params': v['params'], 'adaptors': _randomize(v['adaptors'])}
  bf16 = Decoder(dataclasses.replace(CFG, dtype='bfloat16'), ALL)
  out = bf16.apply(v, tokens, context_ids_BL=ctx)
  assert out.dtype == jnp.float32
  ref = model.apply(v, tokens, context_ids_BL=ctx)
  rel_rms = float(jnp.sqrt(jnp.mean((out - ref) ** 2) / jnp.mean(ref ** 2)))
  assert 0 < rel_rms < 0.06  # bf16 keeps ~3 significant digits per op


def _grads_close(got, want, rtol=0.05):
  """Leafwise |got - want| <= atol + rtol |want| with atol = 8 U max|want| (U = 2**-8, bf16's
  unit roundoff): the two schedules round bf16 products differently, by a few U of the leaf's
  largest entry; a fixed atol would exceed the smallest leaves (LoRA A's gradients ~1e-4)."""
  f32 = lambda tree: [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
  return all(np.allclose(a, b, rtol=rtol, atol=8 * 2.0 ** -8 * np.abs(b).max())
             for a, b in zip(f32(got), f32(want)))


def test_layer_loop_reads_frozen_bf16_weights_as_unrolled_layers_do():
  """bf16 frozen weights in a layer loop (read there as 16-bit integers) give the unrolled
  layers' logits and adaptor gradients; training them in a loop is refused by name, and
  float32 weights still train there."""
  cfg = dataclasses.replace(CFG, dtype='bfloat16', param_dtype='bfloat16', remat=True)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)
  ctx = (tokens % 2).astype(jnp.int32)
  v = Decoder(cfg, ALL).init(jax.random.key(0), tokens, context_ids_BL=ctx)
  v['adaptors'] = jax.tree.map(lambda x: x + 0.01, v['adaptors'])  # LoRA B != 0
  out = {}
  for unroll in (False, True):
    model = Decoder(dataclasses.replace(cfg, unroll_layers=unroll), ALL)
    loss = lambda a, p: model.apply({'params': p, 'adaptors': a}, tokens,
                                    context_ids_BL=ctx).astype(jnp.float32).mean()
    out[unroll] = jax.jit(jax.value_and_grad(loss))(v['adaptors'], v['params'])
  np.testing.assert_allclose(out[False][0], out[True][0], rtol=1e-3)
  for a, b in zip(jax.tree.leaves(out[False][1]), jax.tree.leaves(out[True][1])):
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=0.05, atol=1e-3)
  assert _grads_close(out[False][1], out[True][1])
  # The scaled check would catch a gradient off by a third (the fixed atol 1e-3 would not).
  assert not _grads_close(jax.tree.map(lambda g: g * 0.67, out[False][1]), out[True][1])
  looped = Decoder(dataclasses.replace(cfg, unroll_layers=False), ALL)
  loss = lambda p, a: looped.apply({'params': p, 'adaptors': a}, tokens,
                                   context_ids_BL=ctx).astype(jnp.float32).mean()
  with pytest.raises(ValueError, match='bfloat16 decoder weight .* trained in a layer loop'):
    jax.grad(loss)(v['params'], v['adaptors'])
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), v['params'])
  g32 = jax.grad(loss)(p32, v['adaptors'])
  unrolled = Decoder(dataclasses.replace(cfg, unroll_layers=True), ALL)
  want = jax.grad(lambda p, a: unrolled.apply({'params': p, 'adaptors': a}, tokens,
                                              context_ids_BL=ctx).astype(jnp.float32).mean())(
      p32, v['adaptors'])
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=1e-3)
  assert _grads_close(g32, want)


@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_activation_attention_and_norm_intermediates_are_recomputed_not_kept(monkeypatch, arch):
  """The backward pass keeps the inputs of the MLP activation, of attention and of the norms,
  not their intermediates: SwiGLU's sigmoid and silu (gelu_new's tanh), attention's [B, H, L, L]
  scores and weights, a norm's [B, L, 1] statistics. Fewer [layers, B, L, I] residuals and none
  of the others, where the plain functions keep some, with the same loss and gradients."""
  from cpeft_jax.models import attention, gpt2
  I = 48  # no other width of the model is 48
  cfg = dataclasses.replace(CFG, intermediate_size=I, num_kv_heads=None)
  if arch == 'gpt2':
    cfg = dataclasses.replace(cfg, arch='gpt2', activation='gelu_new', max_positions=16,
                              rope_theta=10000.0)
  model = make_decoder(cfg, PeftConfig(methods=('lora',), num_contexts=2,
                                       lora=LoraConfig(rank=4, alpha=8.0)))
  tokens = _tokens()
  L = tokens.shape[1]  # 9: no other size of the model is 9
  ctx = (tokens % 2).astype(jnp.int32)
  v = model.init(jax.random.key(0), tokens, context_ids_BL=ctx)
  tables = _randomize(v['adaptors'])
  loss = lambda t: jnp.mean(model.apply({'params': v['params'], 'adaptors': t}, tokens,
                                        context_ids_BL=ctx) ** 2)

  def run():
    value, f_vjp = jax.vjp(loss, tables)
    kept = jax.tree.leaves(f_vjp)
    count = lambda tail: sum(x.shape[-len(tail):] == tail for x in kept)
    wide = sum(x.shape == (CFG.num_layers, *tokens.shape, I) for x in kept)
    return value, f_vjp(1.0)[0], (wide, count((L, L)), count((L, 1)))
  value, grads, (wide, weights, stats) = run()
  monkeypatch.setattr(attention, 'recomputed', lambda activation: activation)  # gpt2's act
  monkeypatch.setattr(llama, 'swiglu', lambda gate, up: nn.silu(gate) * up)
  monkeypatch.setattr(attention, 'causal_attention', attention.causal_attention.__wrapped__)
  monkeypatch.setattr(llama, '_rms_norm', llama._rms_norm.__wrapped__)
  monkeypatch.setattr(gpt2, '_RecomputedLayerNorm', nn.LayerNorm)
  want_value, want_grads, (plain_wide, plain_weights, plain_stats) = run()
  assert wide == (2 if arch == 'llama' else 1)  # gate and up; gpt2: the pre-activation
  assert plain_wide > wide
  assert weights == 0 < plain_weights and stats == 0 < plain_stats, (
      weights, plain_weights, stats, plain_stats)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  jax.tree_util.tree_map_with_path(lambda path, a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path)), grads, want_grads)
