"""Two processes x 4 CPU devices (jax.distributed on localhost, the CLIs' own --distributed
flags) against one process x 8 devices, on the same (data=2, fsdp=2, tensor=2) mesh: training
with validation and the best-weights swap, a SIGTERM to one process mid-epoch and the resumed
rerun, then evaluate.py with generated captions. Every figure must equal the one-process run's.

The runs are subprocesses of train.py and evaluate.py as a user starts them on each host; the
one-process reference is a module fixture that every test here shares (one xdist group).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from helpers import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = 'data=2,fsdp=2,tensor=2'
COMMON = ['--config=tests/tiny_run_config.py:2', '--config.eval.batch_size=8', f'--mesh={MESH}']
pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group('multihost')]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(script: str, flags: list[str], log_dir, tag: str, hosts: int = 2):
  """`hosts` processes of `script`, each with its own log files; returns the Popen objects."""
  port = _free_port()
  procs = []
  for i in range(hosts):
    env = dict(cpu_env(8 // hosts), JAX_COORDINATOR_ADDRESS=f'localhost:{port}')
    with open(log_dir / f'{tag}.{i}.out', 'w') as out, open(log_dir / f'{tag}.{i}.err', 'w') as err:
      procs.append(subprocess.Popen(
          [sys.executable, '-u', script, *flags, f'--num_processes={hosts}', f'--process_id={i}'],
          env=env, cwd=ROOT, stdout=out, stderr=err))
  return procs


def _wait(procs, log_dir, tag: str, timeout: float = 600) -> list[int]:
  deadline = time.monotonic() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f'{tag}: a process hung; its log: '
                  f'{(log_dir / f"{tag}.0.err").read_text()[-3000:]}')
  return [p.returncode for p in procs]


def _metrics(workdir) -> dict[int, dict]:
  """{step: metrics line}; a resumed run's lines replace the interrupted run's."""
  out = {}
  for line in open(workdir / 'metrics.jsonl'):
    m = json.loads(line)
    out.setdefault(m['step'], {}).update(m)
  return out


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The one-process, 8-device run (train.py) and its evaluation (evaluate.py)."""
  tmp = tmp_path_factory.mktemp('one_host')
  data = tmp_path_factory.mktemp('tfds')
  workdir = tmp / 'run'
  run = subprocess.run([sys.executable, 'train.py', *COMMON, f'--config.data.data_dir={data}',
                        f'--workdir={workdir}', '--verbosity=0'],  # INFO: the sharding log
                       env=cpu_env(8), cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  return dict(workdir=workdir, data=data, log=run.stderr)


def test_one_device_equals_the_eight_device_mesh(reference, tmp_path):
  workdir = tmp_path / 'run'
  run = subprocess.run([sys.executable, 'train.py', *COMMON[:2], '--mesh=data=1',
                        f'--config.data.data_dir={reference["data"]}', f'--workdir={workdir}'],
                       env=cpu_env(1), cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  # The base really is split: Megatron column/row kernels, LoRA B over 'tensor' and 'fsdp'.
  log = reference['log']
  assert "params/decoder/layers/attn/q_proj/kernel': \"P(None, 'fsdp', 'tensor')" in log
  assert "params/decoder/layers/mlp/down_proj/kernel': \"P(None, 'tensor', 'fsdp')" in log
  assert "/mlp/up_proj/lora_b': \"P(None, None, None, ('tensor', 'fsdp'))" in log
  one, eight = _metrics(workdir), _metrics(reference['workdir'])
  assert sorted(one) == sorted(eight)
  for step, a in one.items():
    for key in a:  # loss, grad_norm, per-context figures, val_loss
      if key.split('/')[0] in ('loss', 'val_loss', 'grad_norm', 'tokens'):
        # Sharded matmuls and reductions change the summation order only.
        np.testing.assert_allclose(a[key], eight[step][key], rtol=2e-4, err_msg=f'{key}@{step}')


def test_two_hosts_train_stop_on_one_signal_resume_and_equal_one_host(reference, tmp_path):
  workdir = tmp_path / 'run'
  flags = [*COMMON, f'--config.data.data_dir={reference["data"]}', f'--workdir={workdir}']
  procs = _start('train.py', flags, tmp_path, 'first')
  # SIGTERM to process 1 alone once training is under way (process 0 has logged step 5): the
  # hosts' vote must stop both after the same step, both joining one save.
  deadline = time.monotonic() + 600
  while not (workdir / 'metrics.jsonl').exists() or 5 not in _metrics(workdir):
    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
      for p in procs:
        p.kill()
      pytest.fail(f'no step 5: {(tmp_path / "first.0.err").read_text()[-3000:]}')
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  codes = _wait(procs, tmp_path, 'first')
  errs = [(tmp_path / f'first.{i}.err').read_text() for i in (0, 1)]
  assert codes[0] != 0 and codes[1] != 0, errs[0][-2000:]
  assert 'Stopped by a signal to another host' in errs[0], errs[0][-2000:]
  assert f'Stopped by signal {int(signal.SIGTERM)}' in errs[1], errs[1][-2000:]
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps and 5 <= steps[-1] < 30, steps

  codes = _wait(_start('train.py', flags, tmp_path, 'rerun'), tmp_path, 'rerun')
  assert codes == [0, 0], (tmp_path / 'rerun.0.err').read_text()[-3000:]
  want, got = _metrics(reference['workdir']), _metrics(workdir)
  assert sorted(got) == sorted(want)
  for step, m in want.items():
    for key in ('loss', 'grad_norm', 'tokens', 'val_loss', 'val_ppl'):
      if key in m:
        np.testing.assert_allclose(got[step][key], m[key], rtol=1e-5, err_msg=f'{key}@{step}')
  best = [json.loads((w / 'best.json').read_text()) for w in (reference['workdir'], workdir)]
  assert best[0]['step'] == best[1]['step']
  np.testing.assert_allclose(best[1]['val_loss'], best[0]['val_loss'], rtol=1e-6)
  exported = [safetensors.numpy.load_file(w / 'export' / 'trainable.safetensors')
              for w in (reference['workdir'], workdir)]
  assert sorted(exported[0]) == sorted(exported[1])
  for k in exported[0]:
    np.testing.assert_allclose(exported[1][k], exported[0][k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_hosts_evaluate_with_captions_as_one_host(reference, tmp_path):
  """evaluate.py on 2 processes: perplexity over global batches, captions gathered to process 0
  and scored there; every number and caption equals the one-process evaluation's."""
  import shutil
  flags = [*COMMON, f'--config.data.data_dir={reference["data"]}', '--show=0']
  one = tmp_path / 'one'
  shutil.copytree(reference['workdir'], one, symlinks=True)
  run = subprocess.run([sys.executable, 'evaluate.py', *flags, f'--workdir={one}'], env=cpu_env(8),
                       cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  two = tmp_path / 'two'
  shutil.copytree(reference['workdir'], two, symlinks=True)
  codes = _wait(_start('evaluate.py', [*flags, f'--workdir={two}'], tmp_path, 'eval'),
                tmp_path, 'eval')
  assert codes == [0, 0], (tmp_path / 'eval.0.err').read_text()[-3000:]
  assert 'validation: caption loss' in (tmp_path / 'eval.0.out').read_text()
  assert 'validation: caption loss' not in (tmp_path / 'eval.1.out').read_text()  # one writer
  want, got = (json.loads((w / 'eval' / 'metrics.json').read_text()) for w in (one, two))
  m1, m2 = want['splits']['validation'], got['splits']['validation']
  assert m1.keys() == m2.keys() and 'CIDEr' in m1 and m1['images'] == m2['images'] == 8
  for key in m1:
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-6, err_msg=key)
  captions = [json.loads((w / 'eval' / 'validation_captions.json').read_text()) for w in (one, two)]
  assert captions[0] == captions[1] and len(captions[0]) == 8
