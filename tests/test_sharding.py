"""The same training run on 1 CPU device and on a simulated 8-device (data, fsdp, tensor) mesh;
partition rules and mesh validation."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from cpeft_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = '''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from helpers import tiny
from cpeft_jax.train import trainer
import jax
from absl import logging
logging.set_verbosity(logging.INFO if {info} else logging.WARNING)  # INFO: the sharding log
c = tiny(1)
c.data.data_dir = {data!r}
c.eval.batch_size = 8
c.mesh = {mesh!r}
print('devices', jax.device_count())
trainer.train_and_evaluate(c, {workdir!r})
'''


def _run(tmp_path, devices, mesh=None):
  workdir = tmp_path / f'mesh{devices}'
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  code = RUN.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), data=str(tmp_path / 'tfds'),
                    workdir=str(workdir), mesh=mesh or sharding.DEFAULT_MESH, info=True)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'devices {devices}' in out.stdout
  return [json.loads(l) for l in open(workdir / 'metrics.jsonl')], out.stderr


def test_one_device_equals_eight_device_mesh(tmp_path):
  (one, _), (eight, log) = _run(tmp_path, 1), _run(tmp_path, 8, dict(data=2, fsdp=2, tensor=2))
  # The base really is split: Megatron column/row kernels, LoRA B over 'tensor'.
  assert "params/decoder/layers/attn/q_proj/kernel': \"P(None, 'fsdp', 'tensor')" in log
  assert "params/decoder/layers/mlp/down_proj/kernel': \"P(None, 'tensor', 'fsdp')" in log
  assert "/mlp/up_proj/lora_b': \"P(None, None, None, 'tensor')" in log
  assert [m['step'] for m in one] == [m['step'] for m in eight]
  for a, b in zip(one, eight):
    for key in a:  # loss, grad_norm, per-context figures, val_loss
      if key.split('/')[0] in ('loss', 'val_loss', 'grad_norm', 'tokens'):
        # Sharded matmuls and reductions change the summation order only.
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, err_msg=f'{key} at {a["step"]}')


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
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
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


MESH8 = types.SimpleNamespace(shape={'data': 2, 'fsdp': 2, 'tensor': 2})


@pytest.mark.parametrize('path,shape,spec', [
    ('params/decoder/layers/attn/k_proj/kernel', (2, 32, 16), (None, 'fsdp', 'tensor')),
    ('params/decoder/layers/mlp/down_proj/kernel', (2, 64, 32), (None, 'tensor', 'fsdp')),
    ('params/decoder/embed_tokens/embedding', (67, 32), (None, 'fsdp')),  # 67 rows: replicated
    ('opt_state/0/mu/adaptors/decoder/layers/attn/o_proj/lora_a', (2, 2, 32, 4),
     (None, None, 'tensor', None)),  # Adam's moments follow their parameter
    ('adaptors/decoder/layers/attn/q_proj/lora_a', (2, 2, 32, 4), (None, None, None, None)),
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
])
def test_partition_rules(path, shape, spec):
  rules = sharding.parse_rules(None)
  assert tuple(sharding.spec_for(path, shape, MESH8, rules)) == spec


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


def _complete_lines(path):
  """The newline-terminated lines of `path` so far (none while it does not exist)."""
  return path.read_text().split('\n')[:-1] if path.exists() else []


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  import signal
  import time
  code = RUN.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), data=str(tmp_path / 'tfds'),
                    workdir=str(tmp_path / 'run'), mesh=sharding.DEFAULT_MESH, info=False,
                    ).replace('tiny(1)', 'tiny(3)')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  log = tmp_path / 'stderr.txt'  # files, not pipes: nothing blocks on an unread pipe
  with open(tmp_path / 'stdout.txt', 'w') as out, open(log, 'w') as errors:
    proc = subprocess.Popen([sys.executable, '-u', '-c', code], env=env, cwd=ROOT, text=True,
                            stdout=out, stderr=errors)
  # The event: the run has written step 5's metrics line (training is under way). Polled, with
  # a generous deadline for a loaded machine (the whole 3-epoch run takes about a minute).
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.monotonic() + 900
  while not any(json.loads(l)['step'] >= 5 for l in _complete_lines(metrics)):
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'no step 5 in {metrics} (exit {proc.poll()}): {log.read_text()[-3000:]}')
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  err = log.read_text()
  assert proc.returncode != 0
  assert 'checkpoint saved, rerun the same command to resume' in err
  steps = sorted(int(p.name) for p in (tmp_path / 'run' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert steps and 5 <= steps[-1] < 45
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert lines[-1]['step'] == 45 and 'val_loss' in lines[-1]


HOST = '''
import sys
sys.path[:0] = [{root!r}]
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize('localhost:{port}', num_processes=2, process_id={i})
import types
import numpy as np
from cpeft_jax import experiment, sharding
exp = types.SimpleNamespace(mesh=sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)),
                            model=types.SimpleNamespace(peft=types.SimpleNamespace(num_contexts=24)))
rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
batch = {{k: rows[{i} * 4:({i} + 1) * 4] for k in experiment.BATCH_KEYS}}  # this host's rows
x = experiment.device_batch(exp, batch)['tokens']
w = jax.jit(lambda a: (a * np.arange(8)[:, None]).sum(), out_shardings=sharding.replicated(exp.mesh))
print('global', x.shape, int(w(x)))
'''


def test_two_hosts_assemble_one_global_batch():
  """Two CPU processes (jax.distributed, gloo) each give 4 rows; the step sees all 8 in order."""
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  procs = [subprocess.Popen([sys.executable, '-c', HOST.format(root=ROOT, port=port, i=i)],
                            env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE) for i in (0, 1)]
  want = int((np.arange(24).reshape(8, 3) * np.arange(8)[:, None]).sum())
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f'global (8, 3) {want}' in out
