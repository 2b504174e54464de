"""The quantized frozen base: qwix formats' round-trip bounds, logits against the
full-precision model, adaptors training on a frozen int4 base (decoder and vision tower),
generation, and per-tensor checkpoint loading against quantizing the whole tree."""

import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpeft_jax import checkpoints
from cpeft_jax import trainable as trainable_lib
from cpeft_jax import quantize as qz
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.data import layout
from cpeft_jax.evaluation import generate as gen
from cpeft_jax.models.clip import config_from_hf as clip_config
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.llama import Decoder
from cpeft_jax.models.vision import ViT
from cpeft_jax.models.vlm import VisionLanguageModel, apply_fn
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib
from qwix._src.core import numerics  # NF4's code book, to derive its error bound

DEC = DecoderConfig(vocab_size=40, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, rope_theta=500.0)
PEFT = PeftConfig(methods=('lora', 'bitfit'), num_contexts=2, lora=LoraConfig(rank=4, alpha=4.0))
FORMATS = [(f, g) for f in ('int8', 'int4', 'nf4') for g in ('channel', 'block')]


def _qcfg(fmt, gran='block', targets='decoder'):
  return qz.QuantConfig(format=fmt, granularity=gran, block_size=16, targets=targets)


def _bound_per_scale(fmt):
  """Largest |x - dequant(quant(x))| / scale that round-to-nearest allows for each format."""
  if fmt == 'nf4':  # half the widest gap between adjacent NF4 code values (scale = absmax)
    return float(np.max(np.diff(np.asarray(numerics.get_nf4_buckets())))) / 2
  return 0.5  # integers: half a step


@pytest.mark.parametrize('fmt,gran', FORMATS)
def test_round_trip_within_format_bound(fmt, gran):
  w = np.array(jax.random.normal(jax.random.key(0), (2, 64, 48)))  # [layers, d_in, d_out]
  w[0, 3, 5] = 9.0  # an outlier: per-block scales keep it from spoiling the other blocks
  q = qz.quantize_leaf(w, 'decoder/layers/mlp/up_proj/kernel', _qcfg(fmt, gran))
  assert isinstance(q, qz.QuantizedKernel)
  scale = np.asarray(q.qarray.scale)
  assert scale.shape == ((2, 1, 48) if gran == 'channel' else (2, 4, 48))
  assert q.qarray.qvalue.shape == w.shape
  assert str(q.qarray.qvalue.dtype) == {'int8': 'int8', 'int4': 'int4', 'nf4': 'uint4'}[fmt]
  scale_full = np.repeat(scale, 64 // scale.shape[1], axis=1)
  err = np.abs(np.asarray(q.dequantize(jnp.float32)) - w)
  bound = _bound_per_scale(fmt) * scale_full
  assert np.all(err <= bound * (1 + 1e-5) + 1e-7), float(np.max(err / bound))
  assert np.max(err / bound) > 0.5  # the bound is tight: the test could fail
  # A block without the outlier has a finer scale than the outlier's own column under
  # per-channel scales.
  if gran == 'block':
    assert scale[0, 1, 5] < scale[0, 0, 5] / 2


@pytest.mark.parametrize('fmt', ['int8', 'int4', 'nf4'])
def test_matmul_within_the_round_trip_bound(fmt):
  """x @ kernel on the quantized kernel: each output is off by at most sum_i |x_i| times the
  round-trip bound of weight (i, j), the format's half step times its block's scale."""
  w = np.asarray(jax.random.normal(jax.random.key(0), (2, 64, 48)))  # [layers, d_in, d_out]
  x = np.asarray(jax.random.normal(jax.random.key(1), (5, 64)))
  q = qz.quantize_leaf(w, 'decoder/layers/mlp/up_proj/kernel', _qcfg(fmt))
  q, w = jax.tree.map(lambda a: a[0], q), w[0]  # layer 0, as the layer loop slices it
  got = np.asarray(jnp.asarray(x) @ q.astype(jnp.float32))
  scale = np.repeat(np.asarray(q.qarray.scale), 16, axis=0)  # [64, 48]: blocks of 16 rows
  bound = np.abs(x) @ (_bound_per_scale(fmt) * scale)
  err = np.abs(got - x @ w)
  assert np.all(err <= bound * (1 + 1e-5) + 1e-5), float(np.max(err / bound))
  assert np.max(err) > 0  # quantized at all


@pytest.fixture(scope='module')
def decoder():
  """A tiny decoder with random LoRA/BitFit tables (so the adaptors matter)."""
  model = Decoder(DEC, PEFT)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 40, (2, 10)), jnp.int32)
  ctx = jnp.asarray(np.arange(20).reshape(2, 10) % 2, jnp.int32)
  v = jax.jit(lambda k: model.init(k, tokens, context_ids_BL=ctx))(jax.random.key(0))
  rng = np.random.default_rng(1)
  v['adaptors'] = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape),
                                                      x.dtype), v['adaptors'])
  fwd = jax.jit(lambda p: model.apply({'params': p, 'adaptors': v['adaptors']}, tokens,
                                      context_ids_BL=ctx))
  return model, v, tokens, fwd


def _weight_error(w, fmt, axis, block=16):
  """Relative RMS error that round-to-nearest in `fmt` may leave in `w`, from the format's step
  alone: a block of `block` values along `axis` has scale absmax / (2**(b-1) - 1) (NF4: absmax
  and its widest code gap), rounding errors are uniform over a step (RMS step / sqrt(12))."""
  gap = 2 * _bound_per_scale(fmt) / (1 if fmt == 'nf4' else {'int8': 127, 'int4': 7}[fmt])
  x = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  amax = np.abs(x.reshape(*x.shape[:-1], -1, block)).max(-1)
  return float(np.sqrt(np.mean((amax * gap) ** 2 / 12) / np.mean(x ** 2)))


def _logit_error(params, fmt):
  """First-order relative RMS error of the logits: a token's path runs through the embedding,
  the 7 projections of each of the 2 layers and the head, whose independent relative weight
  errors add in quadrature (each stacked layer leaf counts once per layer)."""
  e = lambda path, axis=-2: _weight_error(params[path], fmt, axis)
  layers = [e(f'layers/{p}/kernel') for p in ('attn/q_proj', 'attn/k_proj', 'attn/v_proj',
                                               'attn/o_proj', 'mlp/gate_proj', 'mlp/up_proj',
                                               'mlp/down_proj')]
  return float(np.sqrt(e('embed_tokens/embedding', -1) ** 2 + e('lm_head/kernel') ** 2
                       + DEC.num_layers * np.sum(np.square(layers))))


@pytest.mark.parametrize('fmt', ['int8', 'int4', 'nf4'])
def test_quantized_logits(decoder, fmt):
  model, v, tokens, fwd = decoder
  qcfg = _qcfg(fmt, targets='decoder,lm_head,embed')
  qp = qz.quantize_params({'decoder': v['params']}, qcfg)['decoder']
  paths = qz.quantized_paths(qp)
  assert 'lm_head/kernel' in paths and 'embed_tokens/embedding' in paths
  assert 'layers/attn/q_proj/kernel' in paths and 'norm/scale' not in paths
  full, quant = np.asarray(fwd(v['params'])), np.asarray(fwd(qp))
  # The quantized model computes exactly with the dequantized weights ...
  np.testing.assert_allclose(quant, np.asarray(fwd(qz.dequantize_params(qp))), atol=2e-5)
  # ... which stay close to the full-precision model's.
  rel = np.max(np.abs(quant - full)) / np.max(np.abs(full))
  rms = np.sqrt(np.mean((quant - full) ** 2) / np.mean(full ** 2))
  expected = _logit_error(flax.traverse_util.flatten_dict(v['params'], sep='/'), fmt)
  # int8 ~0.019, int4 ~0.32 expected. Factor 2 for the max against the RMS and the second-order
  # terms (at 4 bits errors of ~8% per weight meet softmax, SiLU and RMSNorm); below, a quarter:
  # the logits really carry the format's error (a format quantized too finely or not at all
  # fails, as does one quantized too coarsely, e.g. int8 with int4's step).
  assert 0 < rel <= 2 * expected, (rel, expected)
  assert expected / 4 <= rms <= 2 * expected, (rms, expected)
  if fmt == 'int8':  # generation (KV cache, greedy) runs on the quantized base
    run = lambda p: np.asarray(gen.generate_text(
        model, {'params': p, 'adaptors': v['adaptors']}, tokens[:, :4], max_new_tokens=4,
        eos_id=2, text_context=1))
    np.testing.assert_array_equal(run(qp), run(qz.dequantize_params(qp)))


def test_adaptors_train_on_int4_base():
  """A VLM with an int4 CLIP tower and an int4 decoder: the train step updates the adaptor
  tables and connector while the int4 leaves never change, and greedy captions on the quantized
  base equal those of its dequantized weights. (test_vision loads a tower tensor by tensor.)"""
  N = 4
  b = layout.layout_captions([[5, 6, 7], [8, 9], [10, 11, 12]], num_image_tokens=N, seq_len=10,
                             bos_id=1, eos_id=2, pad_id=0, context_map='modality')
  b['pixels'] = np.asarray(jax.random.uniform(jax.random.key(3), (3, 16, 16, 3)))
  qcfg = _qcfg('int4', targets='decoder,vision')
  tower = clip_config(dict(model_type='clip_vision_model', image_size=16, patch_size=8,
                           hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4))  # drops the class token: N = 4
  encoder = ViT(tower)
  model = VisionLanguageModel(encoder, DEC, PEFT)
  v = jax.jit(model.init)(jax.random.key(0), b['pixels'], b['tokens'], b['kinds'],
                          b['context_ids'])
  v = dict(v, params=qz.quantize_params(v['params'], qcfg))
  trainable, frozen = trainable_lib.split(v, 'peft')
  qpaths = qz.quantized_paths(frozen['params'])
  assert 'encoder/layers/fc1/kernel' in qpaths and 'decoder/layers/mlp/down_proj/kernel' in qpaths
  before = jax.tree.map(np.array, frozen)
  state = state_lib.TrainState.create(trainable, optax.adam(1e-2))
  step = jax.jit(lambda s, f, batch: step_lib.train_step(s, f, batch, jax.random.key(0),
                                                         apply_fn=apply_fn(model)))
  batch = {k: jnp.asarray(x) for k, x in b.items()}
  losses = []
  for _ in range(6):
    state, m = step(state, frozen, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 0.1, losses
  lora_b = state.trainable['adaptors']['decoder']['layers']['attn']['q_proj']['lora_b']
  assert float(jnp.abs(lora_b).max()) > 0  # B starts at zero: the LoRA tables moved
  assert lora_b.dtype == jnp.float32
  same = jax.tree.map(lambda x, y: x.dtype == y.dtype and np.array_equal(x, y), before,
                      jax.tree.map(np.array, frozen))
  assert all(jax.tree.leaves(same))
  caption = lambda f: np.asarray(gen.generate(
      model, trainable_lib.merge(state.trainable, f), b, max_new_tokens=4, eos_id=2, text_context=0))
  np.testing.assert_array_equal(caption(frozen), caption(qz.dequantize_params(frozen)))


def test_per_tensor_loading_matches_quantizing_the_tree(decoder, tmp_path):
  _, v, _, _ = decoder
  checkpoints.save_decoder(tmp_path, DEC, v['params'])
  qcfg = _qcfg('nf4', targets='decoder,lm_head')
  seen = []

  def leaf_fn(path, x):
    seen.append((path, type(x)))
    return qz.leaf_quantizer(qcfg)(path, x)
  per_leaf, _ = checkpoints.load_decoder_params(tmp_path, DEC, leaf_fn=leaf_fn)
  whole = qz.quantize_params({'decoder': checkpoints.load_decoder_params(tmp_path, DEC)[0]},
                             qcfg)['decoder']
  assert len(seen) == len(jax.tree.leaves(v['params']))  # one call per leaf, as it is read
  assert jax.tree.structure(per_leaf) == jax.tree.structure(whole)
  assert qz.quantized_paths(per_leaf) == qz.quantized_paths(whole) != []
  for x, y in zip(jax.tree.leaves(per_leaf), jax.tree.leaves(whole)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_param_bytes_count_packed_4_bit():
  w = jax.ShapeDtypeStruct((2, 64, 48), jnp.float32)
  q = jax.eval_shape(lambda x: qz.quantize_leaf(x, 'decoder/layers/mlp/up_proj/kernel',
                                                _qcfg('int4')), w)
  assert qz.param_bytes(q) == 2 * 64 * 48 // 2 + 2 * 4 * 48 * 4  # 4-bit values, fp32 scales
  assert qz.param_bytes(w) == 2 * 64 * 48 * 4


@pytest.mark.parametrize('bad,match', [
    (dict(format='int3'), 'quantize.format'),
    (dict(format='int4', granularity='tensor'), 'quantize.granularity'),
    (dict(format='int4', targets='decoder,connector'), 'quantize.targets'),
    (dict(format='int4', block_size=0), 'quantize.block_size'),
    (dict(format='int4', bits=4), r"Unknown key\(s\) \['bits'\] in quantize"),
])
def test_bad_config_is_named(bad, match):
  with pytest.raises(ValueError, match=match):
    qz.QuantConfig.from_dict(bad)


def test_errors_at_the_boundary():
  with pytest.raises(ValueError, match=r'axis 1 \(48\) is not a multiple of quantize.block_'):
    qz.quantize_leaf(np.zeros((2, 48, 8), np.float32), 'decoder/layers/mlp/up_proj/kernel',
                     qz.QuantConfig(format='int8', block_size=32))
  with pytest.raises(ValueError, match=r'encoder/stages_0/blocks_0/attn/key/kernel has shape '
                                       r'\(96, 96\): its axis 0 \(96\) is not a multiple'):
    qz.leaf_quantizer(qz.QuantConfig(format='int4', targets='vision'), 'encoder/')(
        'stages_0/blocks_0/attn/key/kernel', np.zeros((96, 96), np.float32))  # Swin-tiny's width
  dora = types.SimpleNamespace(methods=('dora',))  # a PeftConfig's methods, as union
  with pytest.raises(ValueError, match='DoRA'):
    qz.check_peft(qz.QuantConfig(format='int4'), dora)
  qz.check_peft(qz.QuantConfig(format=''), dora)  # no quantization: nothing to refuse
  qz.check_peft(qz.QuantConfig(format='int4'), PEFT)
  with pytest.raises(ValueError, match="train.mode='full'"):
    qz.check_peft(qz.QuantConfig(format='int4'), PEFT, 'full')
