"""The same training run on 1 CPU device and on a simulated 8-device (data, fsdp, tensor) mesh;
partition rules and mesh validation."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from cpeft_jax.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = '''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from test_train_loop import tiny
from cpeft_jax.train import loop
import jax
from absl import logging
logging.set_verbosity(logging.INFO if {info} else logging.WARNING)  # INFO: the sharding log
c = tiny(1)
c.data.data_dir = {data!r}
c.eval.batch_size = 8
c.mesh = {mesh!r}
print('devices', jax.device_count())
loop.train_and_evaluate(c, {workdir!r})
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


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  import signal
  import time
  code = RUN.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), data=str(tmp_path / 'tfds'),
                    workdir=str(tmp_path / 'run'), mesh=sharding.DEFAULT_MESH, info=False,
                    ).replace('tiny(1)', 'tiny(3)')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.Popen([sys.executable, '-u', '-c', code], env=env, cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  for line in proc.stdout:  # the first metrics line: training is under way
    if line.startswith('step 5:'):
      break
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
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
from cpeft_jax.train import loop, sharding
exp = types.SimpleNamespace(mesh=sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)))
rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
batch = {{k: rows[{i} * 4:({i} + 1) * 4] for k in loop.MODEL_KEYS}}  # this host's rows
x = loop._device_batch(exp, batch)['tokens']
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
