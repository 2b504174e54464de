"""Partition rules and mesh validation, a quantized base on a mesh, a signal during a run
(tests/test_multihost.py compares 1 device, 8 devices and 2 processes x 4 devices)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from cpeft_jax import sharding
from helpers import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTIZED = '''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import json, types
import jax, jax.numpy as jnp, numpy as np, optax
from absl import logging
from cpeft_jax import quantize as qz
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.data import layout
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.vlm import VisionLanguageModel, apply_fn
from cpeft_jax import experiment, sharding, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.train import state as state_lib, step as step_lib, trainer
from helpers import PatchEncoder
logging.set_verbosity(logging.INFO)  # the log line of each replicated scale axis
dec = DecoderConfig(vocab_size=40, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128)
model = VisionLanguageModel(PatchEncoder(), dec, PeftConfig(
    methods=('lora', 'bitfit'), num_contexts=2, lora=LoraConfig(rank=4, alpha=4.0)))
b = layout.layout_captions([[5, 6, 7], [8, 9], [10, 11, 12], [13]], num_image_tokens=4,
                           seq_len=10, bos_id=1, eos_id=2, pad_id=0, context_map='modality')
b['pixels'] = np.asarray(jax.random.uniform(jax.random.key(3), (4, 16, 16, 3)))
b = {{k: b[k] for k in experiment.BATCH_KEYS}}
shapes = jax.eval_shape(model.init, jax.random.key(0), b['pixels'], b['tokens'], b['kinds'],
                        b['context_ids'])
rng = np.random.default_rng(0)  # random values (norm scales near 1): no init to compile
v = jax.tree_util.tree_map_with_path(lambda kp, s: jnp.asarray(
    trees.path_str(kp).endswith('/scale') + 0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
qcfg = qz.QuantConfig(format='int4', block_size=64, targets='decoder,lm_head,embed,vision')
v['params'] = jax.jit(lambda p: qz.quantize_params(p, qcfg))(v['params'])
trainable, frozen = trainable_lib.split(v, 'peft')
tx = optax.adam(1e-2)
step = lambda s, f, x: step_lib.train_step(s, f, x, jax.random.key(0), apply_fn=apply_fn(model),
                                           num_contexts=2)
def losses(run, state, frozen, batch):
  out = []
  for _ in range(3):
    state, m = run(state, frozen, batch)
    out.append(float(m['loss']))
  return out, state.trainable
one = losses(jax.jit(step), state_lib.TrainState.create(trainable, tx), frozen, b)
exp = types.SimpleNamespace(config={{}}, mesh=sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)))
placed = trainer.place(exp, trainable, frozen, tx)
run = jax.jit(step, in_shardings=(placed.state_sh, placed.frozen_sh, placed.batch_sh),
              out_shardings=(placed.state_sh, placed.replicated))
eight = losses(run, placed.state, placed.frozen, jax.device_put(b, placed.batch_sh))
shards = {{}}
for kp, x in jax.tree_util.tree_flatten_with_path(placed.frozen)[0]:
  path = trees.path_str(kp)
  if '/qarray/' in path:
    shards[path] = [str(x.sharding.spec), x.addressable_shards[0].data.shape, str(x.dtype)]
print(json.dumps(dict(one=one[0], eight=eight[0], shards=shards, diff=max(
    float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one[1]),
                                                  jax.tree.leaves(eight[1]))))))
'''


def test_quantized_base_trains_sharded_as_unsharded(tmp_path):
  """An int4 base (decoder projections, LM head, embeddings, vision) on an 8-device mesh: the
  4-bit values are split as their kernels, the scales along the axes they share with them, and
  three train steps give the losses and tables of the same steps on one device."""
  env = cpu_env(8)
  out = subprocess.run([sys.executable, '-c', QUANTIZED.format(
      root=ROOT, tests=os.path.join(ROOT, 'tests'))], env=env, capture_output=True, text=True,
      cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  shards, q = res['shards'], 'params/decoder/layers/{}/kernel/qarray/{}'
  # [layers, d_in, d_out] int4 values and [layers, d_in / 64, d_out] scales.
  assert shards[q.format('attn/q_proj', 'qvalue')] == ["P(None, 'fsdp', 'tensor')", [2, 32, 32],
                                                       'int4']
  assert shards[q.format('mlp/down_proj', 'qvalue')] == ["P(None, 'tensor', 'fsdp')",
                                                         [2, 64, 32], 'int4']
  assert shards[q.format('mlp/down_proj', 'scale')] == ["P(None, 'tensor', 'fsdp')", [2, 1, 32],
                                                        'float32']
  # One block along q_proj's 64 inputs: that scale axis stays whole, logged as such.
  assert shards[q.format('attn/q_proj', 'scale')] == ["P(None, None, 'tensor')", [2, 1, 32],
                                                      'float32']
  assert 'q_proj/kernel/qarray/scale dim 1 (1) is not divisible by mesh axis fsdp' in out.stderr
  assert shards['params/decoder/embed_tokens/embedding/qarray/qvalue'][:2] == [
      "P('tensor', 'fsdp')", [20, 32]]
  assert shards['params/decoder/lm_head/kernel/qarray/scale'][:2] == ["P(None, 'tensor')",
                                                                      [1, 20]]
  assert shards['params/encoder/Dense_0/kernel/qarray/qvalue'][0] == 'P(None, None)'  # vision
  np.testing.assert_allclose(res['eight'], res['one'], rtol=2e-4)
  assert res['one'][-1] < res['one'][0] and res['diff'] < 1e-4, res


ARCHS = r'''import sys
sys.path[:0] = [{root!r}]
import json, types
import jax, jax.numpy as jnp, numpy as np, optax
from cpeft_jax import quantize as qz, sharding, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.train import state as state_lib, step as step_lib, trainer
peft = PeftConfig(methods=('lora', 'ia3', 'bitfit'), num_contexts=2, targets='AF',
                  lora=LoraConfig(rank=4, alpha=8.0))
archs = {{'llama': dict(num_kv_heads=2), 'gpt2': dict(activation='gelu_new'),
          'opt': dict(activation='relu', embed_dim=16, max_positions=30)}}
rng = np.random.default_rng(0)
tokens = rng.integers(3, 64, (8, 9))
batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((8, 8), bool),
             context_ids=(np.arange(8)[None] // 4 + np.zeros((8, 1), int)).astype(np.int32))
mesh = sharding.make_mesh({mesh!r})
out = {{}}
for case in {cases!r}:
  arch, _, quant = case.partition('_')
  cfg = DecoderConfig(arch=arch, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=48, **archs[arch])
  model = make_decoder(cfg, peft)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  def fill(kp, s):  # random values from numpy: no init to compile; norms near one
    one = trees.path_str(kp).endswith(('/scale', '/weight', '/ia3'))
    return jnp.asarray(one + 0.2 * rng.standard_normal(s.shape), s.dtype)
  v = jax.tree_util.tree_map_with_path(fill, shapes)
  if quant:
    qcfg = qz.QuantConfig(format=quant, granularity='channel', targets='decoder,lm_head,embed')
    v['params'] = qz.quantize_params({{'decoder': v['params']}}, qcfg)['decoder']
  trainable, frozen = trainable_lib.split(v, 'peft')
  tx = optax.adam(1e-2)
  apply = lambda w, b, train, rng: model.apply(w, b['tokens'], context_ids_BL=b['context_ids'])
  step = lambda s, f, b: step_lib.train_step(s, f, b, jax.random.key(0), apply_fn=apply)
  def losses(run, state, frozen, b):
    got = []
    for _ in range(2):
      state, m = run(state, frozen, b)
      got.append(float(m['loss']))
    return got, state
  placed = trainer.place(types.SimpleNamespace(config={{}}, mesh=mesh), trainable, frozen, tx)
  out[case] = dict(one=[], sharded=[], diff=0.0)
  state = placed.state
  if not quant:  # the int4 test above trains a quantized base sharded; here: its placement
    one, one_state = losses(jax.jit(step), state_lib.TrainState.create(trainable, tx), frozen,
                            batch)
    run = jax.jit(step, in_shardings=(placed.state_sh, placed.frozen_sh, placed.batch_sh),
                  out_shardings=(placed.state_sh, placed.replicated))
    sharded, state = losses(run, placed.state, placed.frozen,
                            jax.device_put(batch, placed.batch_sh))
    out[case].update(one=one, sharded=sharded, diff=max(float(jnp.abs(a - b).max()) for a, b in
                     zip(jax.tree.leaves(one_state.trainable), jax.tree.leaves(state.trainable))))
  leaves = {{}}
  for tree, name in ((placed.frozen, 'frozen'), (state.trainable, 'trainable'),
                     (state.opt_state, 'opt_state')):
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shard = [s for s in x.addressable_shards if s.device == jax.devices()[0]][0]
      leaves[name + '/' + trees.path_str(kp)] = [str(x.sharding.spec), shard.data.nbytes,
                                                 x.nbytes]
  out[case]['leaves'] = leaves
print(json.dumps(out))
'''
# Per architecture: the column-parallel and the row-parallel projections of a block.
PROJECTIONS = {
    'llama': (('attn/q_proj', 'attn/k_proj', 'attn/v_proj', 'mlp/gate_proj', 'mlp/up_proj'),
              ('attn/o_proj', 'mlp/down_proj')),
    'gpt2': (('attn/q_proj', 'attn/k_proj', 'attn/v_proj', 'mlp/c_fc'),
             ('attn/c_proj', 'mlp/c_proj')),
    'opt': (('attn/q_proj', 'attn/k_proj', 'attn/v_proj', 'mlp/fc1'),
            ('attn/out_proj', 'mlp/fc2')),
}
FSDP, TENSOR = 4, 2


def test_every_architecture_shards_its_base_tables_and_moments():
  """Llama, GPT-2, OPT and an int8 Llama with LoRA, IA3 and BitFit tables on a data=1, fsdp=4,
  tensor=2 mesh: every projection kernel (and the int8 values and scales) is split by name;
  device 0 holds 1/fsdp of every table and of its Adam mu and nu, and 1/(fsdp x tensor) of
  those that follow their kernel's tensor split; two train steps give one device's losses and
  tables (Adam's normalised first steps magnify the summation order's rounding to ~2e-5)."""
  cases = ['llama', 'gpt2', 'opt', 'llama_int8']
  # Unoptimised CPU code compiles about 1.5x sooner; both sides of the comparison use it.
  env = cpu_env(8)
  out = subprocess.run([sys.executable, '-c', ARCHS.format(
      root=ROOT, mesh=dict(data=1, fsdp=FSDP, tensor=TENSOR), cases=cases)], env=env,
      capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  for case in cases:
    arch, _, quant = case.partition('_')
    r, (cols, rows) = res[case], PROJECTIONS[arch]
    leaves = r['leaves']
    if not quant:
      np.testing.assert_allclose(r['sharded'], r['one'], rtol=1e-5, err_msg=case)
      assert r['one'][1] < r['one'][0] and r['diff'] < 1e-4, (case, r['diff'])
    # The frozen base: the Megatron layout of every projection, found by its own name.
    kernels = {p for p in leaves if p.startswith('frozen/params/layers/') and (
        p.endswith('/kernel') or p.endswith('/qvalue'))}
    assert len(kernels) == len(cols) + len(rows), (case, kernels)
    for proj in cols + rows:
      kernel = f'frozen/params/layers/{proj}/kernel' + ('/qarray/qvalue' if quant else '')
      spec, shard, whole = leaves[kernel]
      assert spec == ("P(None, 'fsdp', 'tensor')" if proj in cols else
                      "P(None, 'tensor', 'fsdp')"), (kernel, spec)
      assert shard * FSDP * TENSOR == whole, kernel
      if quant:  # one int8 scale per layer and output channel [L, 1, d_out]: d_out's split
        scale = leaves[kernel.replace('qvalue', 'scale')]
        assert scale[0] == ("P(None, None, 'tensor')" if proj in cols else
                            "P(None, None, 'fsdp')"), (kernel, scale)
    head = 'frozen/params/lm_head/kernel' + ('/qarray/qvalue' if quant else '')
    assert leaves[head][0] == "P('fsdp', 'tensor')"
    if arch != 'llama':
      assert leaves['frozen/params/embed_positions/embedding'][0] == "P(None, 'fsdp')"
    if arch == 'opt':
      assert leaves['frozen/params/project_in/kernel'][0] == "P('fsdp', None)"
    # The tables and their moments: 1/fsdp on device 0, 1/(fsdp x tensor) where the table's
    # feature axis is the one its kernel splits over 'tensor'.
    tables = {p: v for p, v in leaves.items() if '/adaptors/' in p}
    assert len(tables) == 3 * sum(1 for p in tables if p.startswith('trainable/'))
    for path, (spec, shard, whole) in tables.items():
      proj, method = '/'.join(path.split('/')[-3:-1]), path.split('/')[-1]
      split = (method in ('lora_b', 'ia3', 'bitfit') if proj in cols else
               method in ('lora_a', 'ia3'))
      assert shard * FSDP * (TENSOR if split else 1) == whole, (case, path, spec, shard, whole)
      param = 'trainable/' + path[path.index('adaptors/'):]
      assert spec == leaves[param][0], (path, spec)  # mu and nu are split as their parameter
    per_device = sum(v[1] for v in tables.values())
    replicated = sum(v[2] for v in tables.values())
    assert replicated / (FSDP * TENSOR) < per_device < replicated / FSDP


MESH8 = types.SimpleNamespace(shape={'data': 2, 'fsdp': 2, 'tensor': 2})


@pytest.mark.parametrize('path,shape,spec', [
    ('params/decoder/layers/attn/k_proj/kernel', (2, 32, 16), (None, 'fsdp', 'tensor')),
    ('params/decoder/layers/mlp/down_proj/kernel', (2, 64, 32), (None, 'tensor', 'fsdp')),
    ('params/decoder/embed_tokens/embedding', (67, 32), (None, 'fsdp')),  # 67 rows: replicated
    # GPT-2's and OPT's names, the positions table and OPT's projection around the blocks.
    ('params/decoder/layers/mlp/c_fc/kernel', (2, 32, 48), (None, 'fsdp', 'tensor')),
    ('params/decoder/layers/attn/c_proj/kernel', (2, 32, 32), (None, 'tensor', 'fsdp')),
    ('params/decoder/layers/mlp/c_proj/kernel', (2, 48, 32), (None, 'tensor', 'fsdp')),
    ('params/decoder/layers/mlp/fc1/kernel', (2, 32, 48), (None, 'fsdp', 'tensor')),
    ('params/decoder/layers/attn/out_proj/kernel', (2, 32, 32), (None, 'tensor', 'fsdp')),
    ('params/decoder/layers/mlp/fc2/kernel', (2, 48, 32), (None, 'tensor', 'fsdp')),
    ('params/decoder/layers/mlp/fc1/bias', (2, 48), (None, 'tensor')),
    ('params/decoder/layers/mlp/fc2/bias', (2, 32), (None, None)),
    ('params/decoder/layers/ln_1/scale', (2, 32), (None, None)),
    ('params/decoder/embed_positions/embedding', (1026, 32), (None, 'fsdp')),
    ('params/decoder/project_in/kernel', (16, 32), ('fsdp', None)),
    # Tables: the feature axis over fsdp, after 'tensor' where the kernel splits it there.
    ('adaptors/decoder/layers/attn/q_proj/lora_a', (2, 2, 32, 4), (None, None, 'fsdp', None)),
    ('adaptors/decoder/layers/attn/q_proj/lora_b', (2, 2, 4, 32),
     (None, None, None, ('tensor', 'fsdp'))),
    ('adaptors/decoder/layers/mlp/c_proj/ia3', (2, 2, 48), (None, None, ('tensor', 'fsdp'))),
    ('adaptors/decoder/layers/mlp/fc2/bitfit', (2, 2, 32), (None, None, 'fsdp')),
    ('opt_state/0/mu/adaptors/decoder/layers/attn/o_proj/lora_a', (2, 2, 32, 4),
     (None, None, ('tensor', 'fsdp'), None)),  # Adam's moments follow their parameter
    ('opt_state/0/nu/adaptors/decoder/layers/mlp/c_proj/lora_b', (2, 2, 4, 32),
     (None, None, None, 'fsdp')),
    # An axis the mesh does not divide keeps the axes that do, in order, or none.
    ('adaptors/decoder/layers/attn/k_proj/lora_b', (2, 2, 4, 6), (None, None, None, 'tensor')),
    ('adaptors/decoder/layers/attn/k_proj/ia3', (2, 2, 5), (None, None, None)),
    ('params/connector/proj/kernel', (96, 32), (None, None)),
    ('opt_state/0/count', (), ()),
    # A quantized kernel's values and per-block scales follow the kernel; a scale axis of one
    # block, or of a block count the mesh axis does not divide, stays whole.
    ('params/decoder/layers/attn/k_proj/kernel/qarray/qvalue', (2, 32, 16),
     (None, 'fsdp', 'tensor')),
    ('params/decoder/layers/attn/k_proj/kernel/qarray/scale', (2, 2, 16),
     (None, 'fsdp', 'tensor')),
    ('params/decoder/layers/mlp/down_proj/kernel/qarray/scale', (2, 3, 32),
     (None, None, 'fsdp')),
    # int8 per channel: [L, 1, d_out] scales split along the output channels only.
    ('params/decoder/layers/mlp/fc1/kernel/qarray/scale', (2, 1, 48), (None, None, 'tensor')),
    ('params/decoder/layers/attn/c_proj/kernel/qarray/scale', (2, 1, 32), (None, None, 'fsdp')),
])
def test_partition_rules(path, shape, spec):
  rules = sharding.parse_rules(None)
  assert tuple(sharding.spec_for(path, shape, MESH8, rules)) == spec


def test_moments_follow_their_parameter_whatever_the_rules_say():
  """A rule anchored at the trainable tree's root does not match the optimizer's longer paths;
  Adam's mu and nu still take their parameter's sharding, the count stays replicated."""
  import jax
  import optax
  from cpeft_jax.train import state as state_lib
  mesh = jax.make_mesh((1, 1, 1), sharding.AXES)
  rules = sharding.parse_rules([(r'^adaptors/.*/lora_a$', (None, 'fsdp', None)), ('.*', ())])
  tables = {'adaptors': {'q_proj': {'lora_a': np.zeros((2, 8, 4), np.float32),
                                    'lora_b': np.zeros((2, 4, 8), np.float32)}}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  shapes = jax.eval_shape(lambda t: state_lib.TrainState.create(t, tx), tables)
  got = sharding.describe(sharding.state_shardings(shapes, mesh, rules))
  assert got == {'trainable/adaptors/q_proj/lora_a': "P(None, 'fsdp', None)",
                 'opt_state/1/0/mu/adaptors/q_proj/lora_a': "P(None, 'fsdp', None)",
                 'opt_state/1/0/nu/adaptors/q_proj/lora_a': "P(None, 'fsdp', None)"}, got


@pytest.mark.parametrize('mesh,devices,sizes_or_error', [
    (dict(data=-1, fsdp=2, tensor=2), 8, {'data': 2, 'fsdp': 2, 'tensor': 2}),
    (None, 4, {'data': 4, 'fsdp': 1, 'tensor': 1}),
    (dict(data=2, fsdp=2, tensor=1), 8, r'spans 4 devices; expected a product of 8'),
    (dict(data=-1, tensor=3), 8, r'fixed axes \(3 devices\) do not divide the 8'),
    (dict(data=-1, fsdp=-1), 8, r'only one axis may be -1'),
    (dict(data=8, model=1), 8, r"unknown axes \['model'\]"),
])
def test_mesh_shape(mesh, devices, sizes_or_error):
  if isinstance(sizes_or_error, dict):
    assert sharding.mesh_shape(mesh, devices) == sizes_or_error
  else:
    with pytest.raises(ValueError, match=sizes_or_error):
      sharding.mesh_shape(mesh, devices)


def test_bad_batch_and_rules_error_clearly():
  with pytest.raises(ValueError, match=r'train.batch_size=6 must be divisible by data x fsdp = 4'):
    sharding.check_batch({'data': 2, 'fsdp': 2, 'tensor': 2}, 'train', 6)
  sharding.check_batch({'data': 2, 'fsdp': 2, 'tensor': 2}, 'train', 8)
  with pytest.raises(ValueError, match=r"names axis 'model'"):
    sharding.parse_rules([('q_proj', (None, 'model'))])
