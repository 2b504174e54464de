"""Per-context adaptor specs: per-token reference, inert padding under Adam, the config surface."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from cpeft_jax import configlib, experiment
from cpeft_jax.adaptors import ContextDense, ContextSpec, LayerAdaptor, LoraConfig, PeftConfig
from helpers import D_IN, D_OUT, init_random, reference

# Context 2 has no adaptor; contexts differ in methods, rank, alpha, scaling rule and init.
MIXED = (dict(methods='lora', rank=5, alpha=3.0),
         dict(methods='lora+bitfit', rank=2, rslora=True, init='gaussian'),
         dict(methods='none'),
         dict(methods='ia3+bitfit'),
         dict(methods='dora+bitfit', rank=3, alpha=4.0))
ADAPTS = {'all_out': LayerAdaptor(lora=True, bitfit=True, ia3='out', dora=True),
          'all_in': LayerAdaptor(lora=True, bitfit=True, ia3='in', dora=True),
          'lora_only': LayerAdaptor(lora=True)}


def mixed_peft(**kw):
  return PeftConfig(methods=('lora',), num_contexts=len(MIXED), contexts=MIXED,
                    lora=LoraConfig(rank=4, alpha=8.0), **kw)


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 11, D_IN)), jnp.float32)
  ctx = jnp.asarray(rng.integers(0, len(MIXED), (2, 11)), jnp.int32)
  return x, ctx


def test_resolved_specs_and_tables(data):
  peft = mixed_peft()
  assert peft.methods == ('lora', 'ia3', 'bitfit', 'dora')
  assert peft.rows == (0, 1, 3, 4) and not peft.uniform
  assert peft.specs[1] == ContextSpec(methods=('lora', 'bitfit'), rank=2, alpha=8.0, rslora=True,
                                      init='gaussian', dropout=0.0)
  assert peft.specs[3].rank == 4  # inherited from peft.lora
  x, ctx = data
  v = ContextDense(D_OUT, peft=peft, adapt=ADAPTS['all_out']).init(jax.random.key(0), x, ctx)
  t = v['adaptors']
  assert t['lora_a'].shape == (4, D_IN, 5) and t['lora_b'].shape == (4, 5, D_OUT)
  assert t['dora_m'].shape == t['bitfit'].shape == t['ia3'].shape == (4, D_OUT)
  a = np.asarray(t['lora_a'])
  assert np.all(a[0] != 0) and np.all(a[1, :, 2:] == 0) and np.all(a[2] == 0)
  assert np.all(a[3, :, 3:] == 0) and np.all(a[3, :, :3] != 0)
  assert abs(a[1, :, :2].std() - 1 / 2) < 0.25  # gaussian init with std 1/rank of its own row


@pytest.mark.parametrize('adapt', list(ADAPTS))
@pytest.mark.parametrize('strategy', ['onehot', 'grouped', 'ragged'])
def test_mixed_specs_match_per_token_reference(data, adapt, strategy):
  x, ctx = data
  peft = mixed_peft(strategy=strategy, tile=4)
  layer, v = init_random(ADAPTS[adapt], peft, x, ctx)
  want = reference(v, ADAPTS[adapt], peft, x.reshape(-1, D_IN), ctx.reshape(-1))
  got = layer.apply(v, x, ctx)
  np.testing.assert_allclose(got, want.reshape(got.shape), rtol=2e-5, atol=2e-5)


def _inert(tables, peft, adapt):
  """The entries the spec says are not real: (name, boolean mask, the value they must hold)."""
  rank_R = adapt.ranks(peft)
  pad_Rr = np.arange(tables['lora_a'].shape[-1])[None, :] >= rank_R[:, None]
  yield 'lora_a', np.broadcast_to(pad_Rr[:, None, :], tables['lora_a'].shape), 0.0
  yield 'lora_b', np.broadcast_to(pad_Rr[:, :, None], tables['lora_b'].shape), 0.0
  for name, fill in (('ia3', 1.0), ('bitfit', 0.0), ('dora_m', 0.0)):
    off_R = ~adapt.rows_with({'dora_m': 'dora'}.get(name, name), peft)
    yield name, np.broadcast_to(off_R[:, None], tables[name].shape), fill


def test_padding_stays_exactly_inert_under_adam(data):
  x, ctx = data
  adapt = ADAPTS['all_out']
  peft = mixed_peft(strategy='grouped', tile=4)
  layer = ContextDense(D_OUT, use_bias=True, peft=peft, adapt=adapt)
  v = layer.init(jax.random.key(0), x, ctx)
  real_Rr = np.arange(5)[None, :] < adapt.ranks(peft)[:, None]  # B nonzero where real only
  b = 0.1 * jax.random.normal(jax.random.key(2), v['adaptors']['lora_b'].shape)
  tables = dict(v['adaptors'], lora_b=b * real_Rr[:, :, None])
  target = jax.random.normal(jax.random.key(3), x.shape[:-1] + (D_OUT,))
  loss = lambda t: jnp.mean((layer.apply({'params': v['params'], 'adaptors': t}, x, ctx)
                             - target) ** 2)
  grads = jax.grad(loss)(tables)
  for name, off, _ in _inert(tables, peft, adapt):
    assert np.all(np.asarray(grads[name])[off] == 0), name
  opt = optax.adam(1e-2)
  state = opt.init(tables)
  start = tables

  @jax.jit
  def step(t, s):
    g = jax.grad(loss)(t)
    u, s = opt.update(g, s, t)
    return optax.apply_updates(t, u), s
  for _ in range(3):
    tables, state = step(tables, state)
  for name, off, fill in _inert(tables, peft, adapt):
    got = np.asarray(tables[name])
    assert np.all(got[off] == fill), name
    assert np.any(got[~off] != np.asarray(start[name])[~off]), name  # the real entries train


def test_uniform_contexts_equal_the_global_config(data):
  x, ctx = data
  plain = PeftConfig(methods=('lora', 'bitfit'), num_contexts=5, lora=LoraConfig(rank=3))
  specs = dataclasses.replace(plain, contexts=({},) * 5)
  assert specs.uniform and specs.methods == plain.methods
  adapt = LayerAdaptor(lora=True, bitfit=True)
  layer, v = init_random(adapt, plain, x, ctx)
  want = np.asarray(layer.apply(v, x, ctx))
  got = ContextDense(D_OUT, use_bias=True, peft=specs, adapt=adapt).apply(v, x, ctx)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_per_context_dropout():
  peft = PeftConfig(num_contexts=2, contexts=(dict(methods='lora', dropout=0.0),
                                              dict(methods='lora', dropout=0.5)))
  x = jax.random.normal(jax.random.key(1), (64, D_IN))
  ctx = jnp.asarray(np.arange(64) % 2)
  layer, v = init_random(ADAPTS['lora_only'], peft, x, ctx)
  train = jax.jit(lambda key: dataclasses.replace(layer, deterministic=False).apply(
      v, x, ctx, rngs={'dropout': key}))
  a, b = (np.asarray(train(jax.random.key(k))) for k in (3, 4))
  eval_out = np.asarray(layer.apply(v, x, ctx))
  np.testing.assert_allclose(a[0::2], eval_out[0::2], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[1::2], b[1::2])


def test_config_surface_through_ml_collections(monkeypatch):
  config = ml_collections.ConfigDict(dict(peft=dict(
      methods=['lora'], num_contexts=3, lora=dict(rank=8, alpha=16.0),
      contexts=dict(c0=dict(rank=64), c2=dict(methods='none')))))
  # config_flags reads its overrides from sys.argv when the flag is defined.
  argv = ['prog', '--config.peft.contexts.c0.rank=32', '--config.peft.contexts.c2.methods=bitfit']
  monkeypatch.setattr(sys, 'argv', argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict('config', config, flag_values=fv)
  fv(argv)
  peft = experiment.peft_config(fv.config)
  assert [(s.methods, s.rank) for s in peft.specs] == [(('lora',), 32), (('lora',), 8),
                                                       (('bitfit',), 8)]
  assert configlib.context_specs('lora:rank=64:alpha=32;lora+bitfit:rank=8:rslora=true;none') == (
      dict(methods='lora', rank=64, alpha=32.0), dict(methods='lora+bitfit', rank=8, rslora=True),
      dict(methods='none'))
  with pytest.raises(ValueError, match=r"context 1 \('lora\+bitfit:rnk=8'\).*'rnk'"):
    configlib.context_specs('lora;lora+bitfit:rnk=8')


@pytest.mark.parametrize('contexts,match', [
    ((dict(methods='lora'),), r'lists 1 contexts but peft.num_contexts=2'),
    ((dict(methods='lora'), dict(methods='lora', rank=0)), r'peft.contexts\[1\].rank must be'),
    ((dict(methods='lora'), dict(methods='ia3+lorra')), r"'lorra' in peft.contexts\[1\].methods"),
    ((dict(methods='lora+dora'), dict()), r"peft.contexts\[0\].methods.*'lora' and 'dora'"),
    ((dict(methods='lora', rnak=4), dict()), r"\['rnak'\] in peft.contexts\[0\]"),
    ((dict(methods='none'), dict(methods='none')), 'no context any method'),
    ((dict(methods='lora', dropout=1.5), dict()), r'peft.contexts\[0\].dropout must be in'),
    (dict(c5=dict(rank=2)), r"key 'c5' must name a context as c0..c1"),
])
def test_bad_specs_name_the_context_and_field(contexts, match):
  with pytest.raises(ValueError, match=match):
    PeftConfig.from_dict(dict(methods=['lora'], num_contexts=2, contexts=contexts))
