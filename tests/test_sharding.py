"""The same training run on 1 CPU device and on a simulated 8-device data mesh."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = '''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from test_train_loop import tiny
from cpeft_jax.train import loop
import jax
c = tiny(1)
c.data.data_dir = {data!r}
c.eval.batch_size = 8
print('devices', jax.device_count())
loop.train_and_evaluate(c, {workdir!r})
'''


def _run(tmp_path, devices):
  workdir = tmp_path / f'mesh{devices}'
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  code = RUN.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), data=str(tmp_path / 'tfds'),
                    workdir=str(workdir))
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'devices {devices}' in out.stdout
  return [json.loads(l) for l in open(workdir / 'metrics.jsonl')]


def test_one_device_equals_eight_device_mesh(tmp_path):
  one, eight = _run(tmp_path, 1), _run(tmp_path, 8)
  assert [m['step'] for m in one] == [m['step'] for m in eight]
  for a, b in zip(one, eight):
    for key in ('loss', 'val_loss', 'grad_norm'):
      if key in a:  # reductions over a sharded batch change the summation order only
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, err_msg=f'{key} at {a["step"]}')


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  import signal
  import time
  code = RUN.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), data=str(tmp_path / 'tfds'),
                    workdir=str(tmp_path / 'run')).replace('tiny(1)', 'tiny(3)')
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
