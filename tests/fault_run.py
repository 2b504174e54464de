"""One tiny training run in its own process, optionally hit by a signal at a chosen moment.

    python tests/fault_run.py WORKDIR DATA_DIR [--fault=WHERE:N:SIGNAL]
    python tests/fault_run.py --sweep OUTDIR [--kills=20] [--seed=0]

WHERE is `batch` (the N-th batch placed on the devices: training steps, then each epoch's
validation batches) or `rename` (the N-th rename that commits an orbax save: the state or the
best weights are fully written, not yet committed). SIGNAL is KILL, INT or TERM. A finished run
writes WORKDIR/result.json. tests/test_faults.py drives it. `--sweep` runs the fault table of
issue 18: kill -9 at random moments, SIGINT and SIGTERM at chosen batches (mid-epoch, last
step, mid-validation) and mid-save, each rerun to the end and compared with a run nothing
interrupted (losses, validation losses, result and best weights, bit for bit).
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import tiny  # noqa: E402

from cpeft_jax import experiment  # noqa: E402
from cpeft_jax.train import trainer  # noqa: E402


def config(data_dir):
  c = tiny(2, checkpoint_every=4)
  c.data.data_dir = data_dir
  return c


def _arm(where: str, n: int, sig: int) -> None:
  calls = [0]

  def hit():
    calls[0] += 1
    if calls[0] == n:
      os.kill(os.getpid(), sig)

  if where == 'batch':
    real = experiment.device_batch

    def device_batch(exp, batch):
      hit()
      return real(exp, batch)
    experiment.device_batch = device_batch
  elif where == 'rename':
    from orbax.checkpoint._src.path import async_path
    real_rename = async_path.rename

    async def rename(src, dst):
      hit()
      return await real_rename(src, dst)
    async_path.rename = rename
  else:
    raise SystemExit(f'unknown fault point {where!r}')


def main(argv):
  workdir, data_dir = argv[1], argv[2]
  for arg in argv[3:]:
    where, n, sig = arg.removeprefix('--fault=').split(':')
    _arm(where, int(n), getattr(signal, f'SIG{sig}'))
  out = trainer.train_and_evaluate(config(data_dir), workdir)
  with open(os.path.join(workdir, 'result.json'), 'w') as f:
    json.dump(out, f)


def run(workdir, data_dir, *faults, kill_after: float | None = None):
  """Runs this file in a subprocess; returns its exit code (negative: killed by a signal)."""
  cmd = [sys.executable, os.path.abspath(__file__), str(workdir), str(data_dir), *faults]
  # Unoptimised CPU code compiles sooner; every run of a comparison uses it.
  env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + (
      ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')).strip())
  with open(os.path.join(os.path.dirname(str(workdir)) or '.', 'fault_run.log'), 'a') as log:
    p = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    try:
      p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  return p.returncode


def outcome(workdir) -> dict:
  """What a finished run leaves: its result, every logged loss, validation losses and a digest
  of its best weights (the bytes of every leaf)."""
  from cpeft_jax import runs, trees
  import numpy as np
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  best = trees.flatten(runs.read_trainable(runs.find_checkpoint(str(workdir), 'best')))
  digest = hashlib.sha256()
  for k in sorted(best):
    digest.update(k.encode() + np.asarray(best[k]).tobytes())
  return {'result': result, 'losses': {l['step']: l['loss'] for l in lines if 'loss' in l},
          'val': [l['val_loss'] for l in lines if 'val_loss' in l], 'best': digest.hexdigest()}


def resume_until_done(workdir, data_dir, limit: int = 6) -> int:
  """Reruns until the run finishes; returns how many reruns it took."""
  for i in range(1, limit + 1):
    if run(workdir, data_dir) == 0:
      return i
  raise RuntimeError(f'{workdir} did not finish in {limit} reruns')


def sweep(outdir: str, kills: int, seed: int) -> None:
  rng = random.Random(seed)
  data_dir = os.path.join(outdir, 'tfds')
  t = time.time()
  assert run(os.path.join(outdir, 'ref'), data_dir) == 0
  length = time.time() - t
  want = outcome(os.path.join(outdir, 'ref'))
  cases = [('kill -9', None, rng.uniform(0.15, 1.0) * length) for _ in range(kills)]
  # 15 steps an epoch, then 2 validation batches: batch 7 mid-epoch, 15 the last step, 16 and
  # 17 validation; rename 1..3: the commit of a checkpoint or of the best weights.
  for sig in ('INT', 'TERM'):
    cases += [(f'SIG{sig}', f'--fault=batch:{n}:{sig}', None) for n in (3, 7, 15, 16, 17)]
    cases += [(f'SIG{sig}', f'--fault=rename:{n}:{sig}', None) for n in (1, 2)]
  cases += [('kill -9', f'--fault=rename:{n}:KILL', None) for n in (1, 2, 3)]
  rows = []
  for i, (kind, fault, after) in enumerate(cases):
    w = os.path.join(outdir, f'case{i}')
    code = run(w, data_dir, *([fault] if fault else []), kill_after=after)
    reruns = resume_until_done(w, data_dir)
    same = outcome(w) == want
    where = fault.removeprefix('--fault=') if fault else f'at {after:.1f}s'
    rows.append((kind, where, code, reruns, same))
    print(f'{kind:8s} {where:22s} exit {code:4d}, reruns {reruns}, '
          f'{"bit-identical" if same else "DIFFERENT"}', flush=True)
  print(f'{sum(r[4] for r in rows)} of {len(rows)} resumed runs bit-identical '
        f'(uninterrupted run {length:.0f}s)')


if __name__ == '__main__':
  if sys.argv[1] == '--sweep':
    opts = dict(a.removeprefix('--').split('=') for a in sys.argv[3:])
    sweep(sys.argv[2], int(opts.get('kills', 20)), int(opts.get('seed', 0)))
  else:
    main(sys.argv)
