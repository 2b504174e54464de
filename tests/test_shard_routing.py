"""Context routing local to each batch shard, on a simulated 8-device mesh (data=2, fsdp=2,
tensor=2): the compiled train step of a tiny decoder with C=4 under the grouped, ragged and
onehot strategies has no collective on the tokens of the global batch, and it computes one
device's losses and table gradients; one adapted layer equals the slow per-token reference.

Everything runs in one subprocess (the 8 devices must exist before JAX starts); the tests read
its JSON.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cpeft_jax import adaptors, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ('grouped', 'ragged', 'onehot')
B, L, C, RANK, HIDDEN = 8, 12, 4, 4, 32  # global batch: B x L = 96 tokens, 4 shards of 24
RATE = 1e3  # SGD's rate: the update -RATE x grad stands far above the tables' rounding

SCRIPT = r'''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import json, re, types
import jax, jax.numpy as jnp, numpy as np, optax
from cpeft_jax import sharding, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.adaptors import LayerAdaptor, LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.train import state as state_lib, step as step_lib, trainer
from helpers import D_IN, init_random, reference
B, L, C, RANK, HIDDEN, RATE = {B}, {L}, {C}, {RANK}, {HIDDEN}, {RATE}
OP = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(([^)]*)\)')
COLLECTIVES = ('all-gather', 'all-reduce', 'all-to-all', 'reduce-scatter', 'collective-permute')

def collectives(hlo):
  """(op, [shape, ...]) of every collective of an optimized HLO module: its result's shapes
  and its operands' (looked up by name)."""
  types_, out = {{}}, []
  for line in hlo.splitlines():
    m = OP.match(line)
    if m:
      types_[m.group(1)] = m.group(2)
  for line in hlo.splitlines():
    m = OP.match(line)
    if m and m.group(3).removesuffix('-start') in COLLECTIVES:
      text = m.group(2) + ' ' + ' '.join(types_.get(n, '') for n in re.findall(r'%([\w.\-]+)',
                                                                             m.group(4)))
      shapes = [[int(d) for d in s.split(',') if d] for s in re.findall(r'\w+\[([\d,]*)\]', text)]
      out.append((m.group(3).removesuffix('-start'), shapes))
  return out

rng = np.random.default_rng(0)
tokens = rng.integers(3, 64, (B, L + 1))
batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=rng.random((B, L)) < 0.8,
             context_ids=rng.integers(0, C, (B, L)).astype(np.int32))
cfg = DecoderConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, num_layers=2,
                    num_heads=2, num_kv_heads=2)
mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
out = dict(step={{}}, layer={{}})
for strategy in {strategies!r}:
  peft = PeftConfig(methods=('lora',), num_contexts=C, targets='AF', strategy=strategy, tile=8,
                    lora=LoraConfig(rank=RANK, alpha=8.0))
  model = make_decoder(cfg, peft)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  v = jax.tree_util.tree_map_with_path(lambda kp, s: jnp.asarray(  # norms near one, B nonzero
      trees.path_str(kp).endswith('/weight') + 0.2 * rng.standard_normal(s.shape), s.dtype),
      shapes)
  trainable, frozen = trainable_lib.split(v, 'peft')
  tx = optax.sgd(RATE)
  apply = lambda w, b, train, rng: model.apply(w, b['tokens'], context_ids_BL=b['context_ids'])
  step = lambda s, f, b: step_lib.train_step(s, f, b, jax.random.key(0), apply_fn=apply)
  def grads(old, new):
    return [np.asarray((a - b) / RATE).tolist() for a, b in zip(jax.tree.leaves(old),
                                                                jax.tree.leaves(new))]
  one_state, one_m = jax.jit(step)(state_lib.TrainState.create(trainable, tx), frozen, batch)
  placed = trainer.place(types.SimpleNamespace(config={{}}, mesh=mesh), trainable, frozen, tx)
  run = jax.jit(step, in_shardings=(placed.state_sh, placed.frozen_sh, placed.batch_sh),
                out_shardings=(placed.state_sh, placed.replicated))
  args = (placed.state, placed.frozen, jax.device_put(batch, placed.batch_sh))
  # The global routing of before under the same shardings (no context mesh: route() sorts the
  # whole batch as one), compiled for the strategy 'auto' picks on CPU: the checker's control.
  global_hlo = run.lower(*args).compile().as_text() if strategy == 'grouped' else ''
  with jax.set_mesh(mesh):
    compiled = run.lower(*args).compile()
  new_state, m = compiled(*args)
  local_hlo = compiled.as_text()
  out['step'][strategy] = dict(
      loss_one=float(one_m['loss']), loss_mesh=float(m['loss']),
      grads_one=grads(trainable, one_state.trainable),
      grads_mesh=grads(trainable, new_state.trainable),
      table_shapes=[list(x.shape[1:]) for x in jax.tree.leaves(trainable)],
      local=collectives(local_hlo), glob=collectives(global_hlo))

  # One layer, C=4 with context 2 unadapted, LoRA + BitFit + IA3: the per-token reference.
  lpeft = PeftConfig(methods=('lora', 'bitfit', 'ia3'), num_contexts=C, adapted_contexts=(0, 1, 3),
                     strategy=strategy, tile=4, lora=LoraConfig(rank=3, alpha=6.0))
  adapt = LayerAdaptor(lora=True, bitfit=True, ia3='out')
  x = jnp.asarray(rng.normal(size=(8, 6, D_IN)), jnp.float32)
  ctx = jnp.asarray(rng.integers(0, C, (8, 6)), jnp.int32)
  layer, lv = init_random(adapt, lpeft, x, ctx)
  def f(tables, x, ctx):
    y = layer.apply({{'params': lv['params'], 'adaptors': tables}}, x, ctx)
    return jnp.sum(jnp.sin(y)), y
  vg = jax.jit(jax.value_and_grad(f, has_aux=True))
  (_, y_one), g_one = vg(lv['adaptors'], x, ctx)
  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    (_, y_mesh), g_mesh = vg(lv['adaptors'], jax.device_put(x, batch_sh),
                             jax.device_put(ctx, batch_sh))
  out['layer'][strategy] = dict(
      want=reference(lv, adapt, lpeft, x.reshape(-1, D_IN), ctx.reshape(-1)).tolist(),
      one=np.asarray(y_one).reshape(-1, y_one.shape[-1]).tolist(),
      mesh=np.asarray(y_mesh).reshape(-1, y_mesh.shape[-1]).tolist(),
      y_sharding=str(y_mesh.sharding.spec),
      grads_one={{k: np.asarray(g).tolist() for k, g in g_one.items()}},
      grads_mesh={{k: np.asarray(g).tolist() for k, g in g_mesh.items()}})
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def runs():
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             + ' '.join(xla_flags.FAST_COMPILE))
  code = SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), B=B, L=L, C=C, RANK=RANK,
                       HIDDEN=HIDDEN, RATE=RATE, strategies=STRATEGIES)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def on_global_tokens(collectives):
  """The collectives with an operand or result over the global batch's tokens: a dimension of
  at least B x L (the flattened tokens, or the grouped strategy's padded buffer of them) or
  the (B, L) pair. Nothing else in the model is that large (vocab 64, features <= 48)."""
  def tokens(dims):
    return any(d >= B * L for d in dims) or any(dims[i:i + 2] == [B, L]
                                                for i in range(len(dims) - 1))
  return [(op, shapes) for op, shapes in collectives if any(tokens(s) for s in shapes)]


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_train_step_has_no_collective_on_global_tokens(runs, strategy):
  """Routed per shard, the step's collectives are the base's and the adaptors' parameter
  traffic only: the tables' fsdp gathers and one all-reduce of their gradients over the batch
  shards (operands shaped as the tables [C, d, r] / [C, r, d]); tokens stay on their shard.
  The same step with the global routing of before (the whole batch sorted as one) all-gathers
  the context ids and all-reduces every token's activations: the checker sees them."""
  r = runs['step'][strategy]
  assert on_global_tokens(r['local']) == []
  if strategy == 'grouped':
    assert on_global_tokens(r['glob']), 'the global routing gathers tokens: is the parser broken?'
  # The allowed parameter-gradient reduction: an all-reduce whose operands are table shapes.
  tables = {tuple(s) for s in r['table_shapes']}
  assert any(op == 'all-reduce' and {tuple(s) for s in shapes} & tables
             for op, shapes in r['local']), r['local']
  # And no all-to-all at all (the adaptors never reshuffle tokens between shards).
  assert not [c for c in r['local'] if c[0] == 'all-to-all']


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_train_step_per_shard_equals_one_device(runs, strategy):
  """Loss and every table's gradient (recovered from one SGD step) as on one device."""
  r = runs['step'][strategy]
  np.testing.assert_allclose(r['loss_mesh'], r['loss_one'], rtol=1e-5)
  for one, mesh in zip(r['grads_one'], r['grads_mesh']):
    one, mesh = np.asarray(one), np.asarray(mesh)
    assert np.abs(one).max() > 1e-4  # every table gets a real gradient
    np.testing.assert_allclose(mesh, one, rtol=1e-3, atol=1e-3 * np.abs(one).max())


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_layer_per_shard_matches_per_token_reference(runs, strategy):
  """One ContextDense (C=4, context 2 unadapted; LoRA, BitFit, IA3) with its batch split over
  the 4 batch shards: the per-token float64 loop's outputs, one device's table gradients."""
  r = runs['layer'][strategy]
  np.testing.assert_allclose(r['mesh'], r['want'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(r['one'], r['want'], rtol=1e-5, atol=1e-5)
  assert r['y_sharding'].startswith("P(('data', 'fsdp')"), r['y_sharding']
  for name, one in r['grads_one'].items():
    one = np.asarray(one)
    np.testing.assert_allclose(r['grads_mesh'][name], one, rtol=1e-4,
                               atol=1e-5 * np.abs(one).max(), err_msg=name)


@pytest.mark.parametrize('backend,rows,rank,want', [
    ('cpu', 1, 64, 'dense'), ('cpu', 2, 64, 'onehot'), ('cpu', 3, 4, 'grouped'),
    ('cpu', 8, 64, 'grouped'),
    ('gpu', 4, 32, 'onehot'), ('tpu', 2, 64, 'onehot'),  # R x r <= 128: one tile wide
    ('gpu', 4, 64, 'ragged'), ('tpu', 8, 16, 'onehot'), ('tpu', 3, 64, 'ragged'),
])
def test_auto_strategy_by_backend_and_shape(backend, rows, rank, want):
  assert adaptors.pick_strategy('auto', rows, rank, backend) == want
  assert adaptors.pick_strategy('grouped', rows, rank, backend) == (
      'dense' if rows == 1 else 'grouped')
