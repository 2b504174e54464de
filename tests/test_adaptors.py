"""ContextDense against a slow per-token reference, isolation of context groups, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpeft_jax import adaptors
from cpeft_jax.adaptors import ContextDense, LayerAdaptor, LoraConfig, PeftConfig

D_IN, D_OUT, RANK = 12, 10, 3
COMBOS = {
    'lora': LayerAdaptor(lora=True),
    'ia3_out': LayerAdaptor(ia3='out'),
    'ia3_in': LayerAdaptor(ia3='in'),
    'bitfit': LayerAdaptor(bitfit=True),
    'lora+bitfit': LayerAdaptor(lora=True, bitfit=True),
    'all_in': LayerAdaptor(lora=True, bitfit=True, ia3='in'),
    'all_out': LayerAdaptor(lora=True, bitfit=True, ia3='out'),
}


def _peft(methods, num_contexts, **kw):
  return PeftConfig(methods=methods, num_contexts=num_contexts,
                    lora=LoraConfig(rank=RANK, alpha=6.0), **kw)


def _methods(adapt):
  return tuple(m for m, on in (('lora', adapt.lora), ('ia3', adapt.ia3), ('bitfit', adapt.bitfit))
               if on)


def _randomize(tables, seed):
  """Replaces every adaptor table (B = 0, IA3 = 1 at init) by random values."""
  leaves, treedef = jax.tree.flatten(tables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _layer(adapt, peft, use_bias=True):
  return ContextDense(D_OUT, use_bias=use_bias, peft=peft, adapt=adapt)


def _init(adapt, peft, x, ctx, seed=0):
  layer = _layer(adapt, peft)
  v = layer.init(jax.random.key(seed), x, ctx)
  v = {'params': v['params'], 'adaptors': _randomize(v['adaptors'], seed + 1)}
  v['params'] = dict(v['params'], bias=jax.random.normal(jax.random.key(9), (D_OUT,)))
  return layer, v


def reference(v, adapt, peft, x_TD, ctx_T):
  """Slow per-token loop in float64: y_t = ((x*s_in) W + b) * s_out + bitfit + scale x A B."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])
  t = jax.tree.map(lambda a: np.asarray(a, np.float64), v['adaptors'])
  x_TD = np.asarray(x_TD, np.float64)
  out = []
  for x, c in zip(x_TD, np.asarray(ctx_T)):
    if c not in peft.rows:
      out.append(x @ p['kernel'] + p['bias'])
      continue
    r = peft.rows.index(c)
    xin = x * t['ia3'][r] if adapt.ia3 == 'in' else x
    y = xin @ p['kernel'] + p['bias']
    if adapt.ia3 == 'out':
      y = y * t['ia3'][r]
    if adapt.bitfit:
      y = y + t['bitfit'][r]
    if adapt.lora:
      y = y + peft.lora.scale * (x @ t['lora_a'][r] @ t['lora_b'][r])
    out.append(y)
  return np.stack(out)


@pytest.mark.parametrize('combo', list(COMBOS))
@pytest.mark.parametrize('num_contexts', [1, 2, 5])
def test_layer_matches_per_token_reference(combo, num_contexts):
  adapt = COMBOS[combo]
  peft = _peft(_methods(adapt), num_contexts)
  rng = np.random.default_rng(num_contexts)
  x = jnp.asarray(rng.normal(size=(3, 7, D_IN)), jnp.float32)
  ctx = jnp.asarray(rng.integers(0, num_contexts, (3, 7)), jnp.int32)
  layer, v = _init(adapt, peft, x, ctx)
  want = reference(v, adapt, peft, x.reshape(-1, D_IN), ctx.reshape(-1)).reshape(3, 7, D_OUT)
  np.testing.assert_allclose(layer.apply(v, x, ctx), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('strategy', ['onehot', 'grouped', 'ragged'])
@pytest.mark.parametrize('num_contexts,adapted', [(2, None), (5, None), (5, (1, 3, 4)), (3, (2,))])
def test_lora_strategies_match_reference(strategy, num_contexts, adapted):
  adapt = COMBOS['lora']
  peft = _peft(('lora',), num_contexts, adapted_contexts=adapted, strategy=strategy, tile=4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 11, D_IN)), jnp.float32)
  # Context 0 never occurs: an empty group must not disturb the tiles of the others.
  ctx = jnp.asarray(rng.integers(1, num_contexts, (2, 11)) if num_contexts > 2 else
                    rng.integers(0, 2, (2, 11)), jnp.int32)
  layer, v = _init(adapt, peft, x, ctx)
  want = reference(v, adapt, peft, x.reshape(-1, D_IN), ctx.reshape(-1)).reshape(2, 11, D_OUT)
  np.testing.assert_allclose(layer.apply(v, x, ctx), want, rtol=1e-5, atol=1e-5)
  grads = {}
  for s in ('onehot', strategy):
    lay = _layer(adapt, dataclasses.replace(peft, strategy=s))
    loss = lambda t: jnp.sum(jnp.sin(lay.apply({'params': v['params'], 'adaptors': t}, x, ctx)))
    grads[s] = jax.grad(loss)(v['adaptors'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()),
               grads['onehot'], grads[strategy])


@pytest.mark.parametrize('combo', list(COMBOS))
def test_fresh_adaptors_are_bit_identical_to_base(combo):
  adapt = COMBOS[combo]
  peft = _peft(_methods(adapt), 3)
  x = jax.random.normal(jax.random.key(1), (2, 5, D_IN))
  ctx = jnp.asarray([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
  layer = _layer(adapt, peft)
  v = layer.init(jax.random.key(0), x, ctx)
  base = ContextDense(D_OUT, use_bias=True).apply({'params': v['params']}, x, ctx)
  assert np.array_equal(np.asarray(layer.apply(v, x, ctx)), np.asarray(base))


def test_changing_group_c_changes_only_tokens_of_context_c():
  adapt = COMBOS['all_out']
  peft = _peft(_methods(adapt), 3)
  x = jax.random.normal(jax.random.key(1), (2, 6, D_IN))
  ctx = jnp.asarray([[0, 1, 2, 0, 1, 2], [2, 2, 1, 0, 0, 1]])
  layer, v = _init(adapt, peft, x, ctx)
  before = np.asarray(layer.apply(v, x, ctx))
  for c in range(3):
    bumped = jax.tree.map(lambda a: a.at[c].add(0.5), v['adaptors'])
    after = np.asarray(layer.apply({'params': v['params'], 'adaptors': bumped}, x, ctx))
    changed = np.any(after != before, axis=-1)
    np.testing.assert_array_equal(changed, np.asarray(ctx) == c)


@pytest.mark.parametrize('strategy', ['onehot', 'grouped', 'ragged'])
def test_gradient_of_absent_context_is_zero(strategy):
  adapt = COMBOS['all_in']
  peft = _peft(_methods(adapt), 4, strategy=strategy, tile=2)
  x = jax.random.normal(jax.random.key(1), (2, 5, D_IN))
  ctx = jnp.asarray([[0, 1, 3, 0, 1], [3, 3, 1, 0, 0]])  # context 2 absent
  layer, v = _init(adapt, peft, x, ctx)
  g = jax.grad(lambda t: jnp.sum(layer.apply({'params': v['params'], 'adaptors': t}, x, ctx) ** 2))(
      v['adaptors'])
  for name, leaf in g.items():
    assert np.all(np.asarray(leaf[2]) == 0), name
    for c in (0, 1, 3):
      assert np.any(np.asarray(leaf[c]) != 0), (name, c)


def test_agnostic_equals_plain_lora_math():
  peft = _peft(('lora',), 1)
  x = jax.random.normal(jax.random.key(1), (4, D_IN))
  layer, v = _init(COMBOS['lora'], peft, x, jnp.zeros((4,), jnp.int32))
  p, t = v['params'], v['adaptors']
  want = x @ p['kernel'] + p['bias'] + (x @ t['lora_a'][0]) @ t['lora_b'][0] * (6.0 / RANK)
  np.testing.assert_allclose(layer.apply(v, x, jnp.zeros((4,), jnp.int32)), want, rtol=1e-6)


def test_unadapted_context_sees_the_base_only():
  peft = _peft(('lora', 'bitfit'), 2, adapted_contexts=(1,))  # adapt image tokens only
  x = jax.random.normal(jax.random.key(1), (6, D_IN))
  ctx = jnp.asarray([1, 1, 0, 0, 1, 0])
  layer, v = _init(COMBOS['lora+bitfit'], peft, x, ctx)
  assert v['adaptors']['lora_a'].shape == (1, D_IN, RANK)
  out = np.asarray(layer.apply(v, x, ctx))
  base = np.asarray(ContextDense(D_OUT, use_bias=True).apply({'params': v['params']}, x, ctx))
  np.testing.assert_array_equal(out[ctx == 0], base[ctx == 0])
  assert np.all(np.abs(out[ctx == 1] - base[ctx == 1]).max(-1) > 1e-3)


def test_rslora_scale_and_inits():
  assert LoraConfig(rank=16, alpha=8.0).scale == 0.5
  assert LoraConfig(rank=16, alpha=8.0, rslora=True).scale == 2.0
  x = jnp.zeros((1, 256))
  for init, check in (('kaiming_uniform', lambda a: np.abs(a).max() <= 1 / 16 and a.std() > 0.03),
                      ('gaussian', lambda a: abs(a.std() - 1 / 8) < 0.01)):
    peft = PeftConfig(methods=('lora',), lora=LoraConfig(rank=8, init=init))
    v = ContextDense(4, peft=peft, adapt=COMBOS['lora']).init(jax.random.key(0), x,
                                                               jnp.zeros((1,), jnp.int32))
    a = np.asarray(v['adaptors']['lora_a'])
    assert check(a), init
    assert not np.any(np.asarray(v['adaptors']['lora_b']))


def test_lora_dropout_only_in_training():
  peft = PeftConfig(methods=('lora',), lora=LoraConfig(rank=RANK, dropout=0.5))
  x = jax.random.normal(jax.random.key(1), (64, D_IN))
  ctx = jnp.zeros((64,), jnp.int32)
  layer, v = _init(COMBOS['lora'], peft, x, ctx)
  train = dataclasses.replace(layer, deterministic=False)
  a = train.apply(v, x, ctx, rngs={'dropout': jax.random.key(3)})
  b = train.apply(v, x, ctx, rngs={'dropout': jax.random.key(4)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(layer.apply(v, x, ctx), layer.apply(v, x, ctx))


@pytest.mark.parametrize('kwargs,match', [
    (dict(methods=('lora',), lora=LoraConfig(rank=0)), 'rank must be an integer >= 1'),
    (dict(methods=('lora',), lora=LoraConfig(alpha=-1.0)), 'alpha must be > 0'),
    (dict(methods=('dora2',)), "Unknown PEFT method 'dora2'"),
    (dict(num_contexts=0), 'num_contexts must be an integer >= 1'),
    (dict(num_contexts=2, adapted_contexts=(2,)), r'adapted_contexts=\(2,\)'),
    (dict(methods=('lora',), strategy='fast'), "strategy='fast'"),
    (dict(methods=('lora',), lora=LoraConfig(init='xavier')), "init='xavier'"),
    (dict(methods=('lora',), lora=LoraConfig(dropout=1.0)), 'dropout must be in'),
])
def test_bad_configs_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    PeftConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
  with pytest.raises(ValueError, match=r"Unknown key\(s\) \['rnak'\] in peft.lora"):
    PeftConfig.from_dict({'methods': ['lora'], 'lora': {'rnak': 4}})
  p = PeftConfig.from_dict({'methods': ['lora'], 'lora': {'rank': 4}, 'num_contexts': 2})
  assert p.lora.rank == 4 and p.methods == ('lora',) and p.rows == (0, 1)


def test_context_ids_out_of_range_are_rejected_at_the_boundary():
  with pytest.raises(ValueError, match=r'num_contexts=2 \(valid ids are 0..1\)'):
    adaptors.check_context_ids(np.array([[0, 2]]), 2)
  with pytest.raises(ValueError, match='integer array'):
    adaptors.check_context_ids(np.array([0.5]), 2)
  adaptors.check_context_ids(np.array([[0, 1]]), 2)


PROJ = (adaptors.Projection('attn/q_proj', 'A'), adaptors.Projection('attn/k_proj', 'A', 'out'),
        adaptors.Projection('attn/v_proj', 'A', 'out'), adaptors.Projection('attn/o_proj', 'A'),
        adaptors.Projection('mlp/up_proj', 'F'), adaptors.Projection('mlp/down_proj', 'F', 'in'))


def test_target_presets_and_patterns():
  got = adaptors.resolve_targets(PeftConfig(methods=('lora', 'ia3'), targets='A'), PROJ)
  assert [n for n, a in got.items() if a.lora] == ['attn/q_proj', 'attn/k_proj', 'attn/v_proj',
                                                    'attn/o_proj']
  assert {n: a.ia3 for n, a in got.items() if a.ia3} == {'attn/k_proj': 'out',
                                                          'attn/v_proj': 'out'}
  got = adaptors.resolve_targets(PeftConfig(methods=('ia3',), targets='F'), PROJ)
  assert {n: a.ia3 for n, a in got.items() if a.ia3} == {'mlp/down_proj': 'in'}
  got = adaptors.resolve_targets(
      PeftConfig(methods=('lora', 'bitfit'), targets='q_proj,mlp/*',
                 method_targets={'bitfit': 'all'}), PROJ)
  assert {n for n, a in got.items() if a.lora} == {'attn/q_proj', 'mlp/up_proj', 'mlp/down_proj'}
  assert all(a.bitfit for a in got.values())


def test_unknown_target_lists_available_names():
  with pytest.raises(ValueError, match=r"'qq_proj'.*attn/q_proj.*mlp/down_proj"):
    adaptors.resolve_targets(PeftConfig(methods=('lora',), targets='q_proj,qq_proj'), PROJ)
