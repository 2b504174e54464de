"""Context routing local to each batch shard, on a simulated 8-device mesh (data=2, fsdp=2,
tensor=2): the compiled train step of a tiny decoder with C=4 under the grouped, ragged and
onehot strategies (and grouped with 2 micro-batches) has no collective on the tokens of the
global batch, and it computes one device's losses and table gradients; one adapted layer
equals the slow per-token reference.

Everything runs in one subprocess (the 8 devices must exist before JAX starts); the tests read
its JSON.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cpeft_jax import adaptors
from helpers import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ('grouped', 'ragged', 'onehot')
CASES = {s: (s, 1) for s in STRATEGIES} | {'grouped_micro2': ('grouped', 2)}  # micro_steps
# Global batch: B x L = 96 tokens, 4 shards of 24; a micro-batch of two: 48 tokens. Every
# parameter dimension is below 48 (vocab and MLP 40, hidden 32).
B, L, C, RANK, HIDDEN = 8, 12, 4, 4, 32
RATE = 1e3  # SGD's rate: the update -RATE x grad stands far above the tables' rounding

SCRIPT = r'''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import dataclasses, json, types
import jax, jax.numpy as jnp, numpy as np, optax
from cpeft_jax import sharding, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.adaptors import LayerAdaptor, LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.train import state as state_lib, step as step_lib, trainer
from helpers import D_IN, init_random, reference
hlo_dir = {hlo_dir!r}
B, L, C, RANK, HIDDEN, RATE = {B}, {L}, {C}, {RANK}, {HIDDEN}, {RATE}

rng = np.random.default_rng(0)
tokens = rng.integers(3, 40, (B, L + 1))
batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=rng.random((B, L)) < 0.8,
             context_ids=rng.integers(0, C, (B, L)).astype(np.int32))
cfg = DecoderConfig(vocab_size=40, hidden_size=HIDDEN, intermediate_size=40, num_layers=2,
                    num_heads=2, num_kv_heads=2)
mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
out = dict(step={{}}, layer={{}})
for case, (strategy, micro_steps) in {cases!r}.items():
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
  step = lambda s, f, b: step_lib.train_step(s, f, b, jax.random.key(0), apply_fn=apply,
                                             micro_steps=micro_steps)
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
  if case == 'grouped':
    with open(f'{{hlo_dir}}/global.hlo', 'w') as f:
      f.write(run.lower(*args).compile().as_text())
  with jax.set_mesh(mesh):
    compiled = run.lower(*args).compile()
  new_state, m = compiled(*args)
  with open(f'{{hlo_dir}}/{{case}}.hlo', 'w') as f:
    f.write(compiled.as_text())
  out['step'][case] = dict(
      loss_one=float(one_m['loss']), loss_mesh=float(m['loss']),
      grads_one=grads(trainable, one_state.trainable),
      grads_mesh=grads(trainable, new_state.trainable),
      table_shapes=[list(x.shape[1:]) for x in jax.tree.leaves(trainable)])
  if micro_steps > 1:
    continue

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

# bf16 compute under the mesh: the tables' gradients are summed over the batch shards (a bf16
# all-reduce there once aborted XLA:CPU's compiler).
bpeft = PeftConfig(methods=('lora',), num_contexts=C, targets='AF', strategy='onehot',
                   lora=LoraConfig(rank=RANK, alpha=8.0))
bmodel = make_decoder(dataclasses.replace(cfg, dtype='bfloat16'), bpeft)
bv = bmodel.init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))
btrain, bfrozen = trainable_lib.split(bv, 'peft')
bapply = lambda w, b, train, rng: bmodel.apply(w, b['tokens'], context_ids_BL=b['context_ids'])
bstep = lambda s, f, b: step_lib.train_step(s, f, b, jax.random.key(0), apply_fn=bapply)
tx = optax.sgd(RATE)
_, bone = jax.jit(bstep)(state_lib.TrainState.create(btrain, tx), bfrozen, batch)
placed = trainer.place(types.SimpleNamespace(config={{}}, mesh=mesh), btrain, bfrozen, tx)
run = jax.jit(bstep, in_shardings=(placed.state_sh, placed.frozen_sh, placed.batch_sh),
              out_shardings=(placed.state_sh, placed.replicated))
with jax.set_mesh(mesh):
  _, bmesh = run(placed.state, placed.frozen, jax.device_put(batch, placed.batch_sh))
out['bf16'] = dict(loss_one=float(bone['loss']), loss_mesh=float(bmesh['loss']))
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  hlo_dir = tmp_path_factory.mktemp('hlo')
  env = cpu_env(8)
  code = SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), B=B, L=L, C=C, RANK=RANK,
                       HIDDEN=HIDDEN, RATE=RATE, cases=CASES, hlo_dir=str(hlo_dir))
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  for case in CASES:
    res['step'][case]['local'] = collectives((hlo_dir / f'{case}.hlo').read_text())
  res['step']['grouped']['glob'] = collectives((hlo_dir / 'global.hlo').read_text())
  return res


OP = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(([^)]*)\)(.*)$')
COLLECTIVES = ('all-gather', 'all-reduce', 'all-to-all', 'reduce-scatter', 'collective-permute')
TENSOR = 2  # partition p of the data=2, fsdp=2, tensor=2 mesh is on batch shard p // TENSOR


def _groups(attrs):
  """The partition groups of a collective's attributes, in each of the forms XLA prints:
  source_target_pairs={{0,1},..}, replica_groups={{0,2},..}, the iota form [G,S]<=[dims]T(perm),
  and the mesh form mesh['axis_0'=n,..] (device_ids=([dims]T(perm))) {'axis_k',..}."""
  if m := re.search(r'(?:source_target_pairs|replica_groups)=\{(\{[\d,{}]*\})\}', attrs):
    return [[int(d) for d in g.split(',')] for g in re.findall(r'\{([\d,]+)\}', m.group(1))]
  if m := re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', attrs):
    return _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2))).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
                r"(?:T\(([\d,]+)\))?\))? \{([^}]*)\}", attrs)
  assert m, f'unparsed collective: {attrs[:300]}'
  names = re.findall(r"'(\w+)'=", m.group(1))
  sizes = [int(n) for n in re.findall(r"=(\d+)", m.group(1))]
  ids = (_iota(m.group(2), m.group(3)) if m.group(2) else np.arange(np.prod(sizes))).reshape(sizes)
  over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
  ids = np.moveaxis(ids, over, list(range(-len(over), 0)))
  return ids.reshape(-1, int(np.prod([sizes[a] for a in over]))).tolist()


def _iota(dims, perm):
  ids = np.arange(np.prod([int(d) for d in dims.split(',')])).reshape(
      [int(d) for d in dims.split(',')])
  return ids.transpose([int(p) for p in perm.split(',')]) if perm else ids


def collectives(hlo):
  """(op, [shape, ...], crosses) of every collective of an optimized HLO module: its result's
  and operands' shapes (operands looked up by name), and whether a group spans batch shards."""
  types, out = {}, []
  lines = [m for m in map(OP.match, hlo.splitlines()) if m]
  for m in lines:
    types[m.group(1)] = m.group(2)
  for m in lines:
    op = m.group(3).removesuffix('-start')
    if op in COLLECTIVES:
      text = m.group(2) + ' ' + ' '.join(types.get(n, '') for n in re.findall(r'%([\w.\-]+)',
                                                                            m.group(4)))
      shapes = [[int(d) for d in s.split(',') if d] for s in re.findall(r'\w+\[([\d,]*)\]', text)]
      crosses = any(len({p // TENSOR for p in g}) > 1 for g in _groups(m.group(5)))
      out.append((op, shapes, crosses))
  return out


def on_global_tokens(collectives, rows=B):
  """The collectives with an operand or result over the tokens of `rows` global rows (the
  batch, or a micro-batch): a dimension of at least rows x L (the flattened tokens, or the
  grouped strategy's padded buffer of them) or the (rows, L) pair. Nothing else in the model
  is that large (every parameter dimension is below 48)."""
  def tokens(dims):
    return any(d >= rows * L for d in dims) or any(dims[i:i + 2] == [rows, L]
                                                   for i in range(len(dims) - 1))
  return [(op, shapes) for op, shapes, _ in collectives if any(tokens(s) for s in shapes)]


def between_shards(collectives):
  """The collectives that move token-shaped data between batch shards: a group spans shards
  and an operand has a dimension of whole sequences (a multiple of L: positions, a shard's
  flattened tokens) or of 48 and more (padded token buffers). No parameter dimension is either
  (2, 4, 16, 32, 40), so the fsdp gathers and gradient reductions of the weights pass."""
  def tokens(dims):
    return any(d % L == 0 or d >= 4 * L for d in dims)
  return [(op, shapes) for op, shapes, crosses in collectives
          if crosses and any(tokens(s) for s in shapes)]


@pytest.mark.parametrize('case', CASES)
def test_train_step_has_no_collective_on_global_tokens(runs, case):
  """Routed per shard, the step's collectives are the base's and the adaptors' parameter
  traffic only: the tables' fsdp gathers and one all-reduce of their gradients over the batch
  shards (operands shaped as the tables [C, d, r] / [C, r, d]); tokens stay on their shard.
  Tokens cross only the 'tensor' axis, inside a shard, as the base's Megatron layout has them.
  The same step with the global routing of before (the whole batch sorted as one) all-gathers
  the context ids and all-reduces every token's activations: the checker sees them.
  With micro-batches, each takes rows of every shard: none is moved between devices."""
  r = runs['step'][case]
  assert on_global_tokens(r['local'], B // CASES[case][1]) == []
  assert between_shards(r['local']) == []
  if case == 'grouped':
    assert on_global_tokens(r['glob']), 'the global routing gathers tokens: is the parser broken?'
    assert between_shards(r['glob'])
  # The allowed parameter-gradient reduction: an all-reduce whose operands are table shapes,
  # over the batch shards.
  tables = {tuple(s) for s in r['table_shapes']}
  assert any(op == 'all-reduce' and crosses and {tuple(s) for s in shapes} & tables
             for op, shapes, crosses in r['local']), r['local']
  # And no all-to-all at all (the adaptors never reshuffle tokens between shards).
  assert not [c for c in r['local'] if c[0] == 'all-to-all']


@pytest.mark.parametrize('case', CASES)
def test_train_step_per_shard_equals_one_device(runs, case):
  """Loss and every table's gradient (recovered from one SGD step) as on one device."""
  r = runs['step'][case]
  np.testing.assert_allclose(r['loss_mesh'], r['loss_one'], rtol=1e-5)
  for one, mesh in zip(r['grads_one'], r['grads_mesh']):
    one, mesh = np.asarray(one), np.asarray(mesh)
    assert np.abs(one).max() > 1e-4  # every table gets a real gradient
    np.testing.assert_allclose(mesh, one, rtol=1e-3, atol=1e-3 * np.abs(one).max())


def test_bf16_train_step_compiles_and_runs_per_shard(runs):
  bf16 = runs['bf16']
  np.testing.assert_allclose(bf16['loss_mesh'], bf16['loss_one'], rtol=2e-2)


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
