"""One tiny training run in its own process, optionally hit by a signal at a chosen moment.

    python tests/fault_run.py WORKDIR DATA_DIR [--fault=WHERE:N:SIGNAL]
    python tests/fault_run.py --sweep OUTDIR [--kills=20] [--seed=0] [--points=KILL,INT,TERM]

WHERE is `batch` (the N-th batch placed on the devices: training steps, then each epoch's
validation batches) or `rename` (the N-th rename that commits an orbax save: the state or the
best weights are fully written, not yet committed). SIGNAL is KILL, INT or TERM. A finished run
writes WORKDIR/result.json. tests/test_faults.py drives it. `--sweep` runs the fault table of
issue 18: kill -9 at random moments, and kill -9, SIGINT and SIGTERM at chosen batches
(mid-epoch, last step, mid-validation) and mid-save (`cases`), each rerun to the end and
compared with a run nothing interrupted (losses, validation losses, result and best weights,
bit for bit).
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

from cpeft_jax import experiment, xla_flags  # noqa: E402
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
  env = dict(os.environ)  # unoptimised CPU code compiles sooner; every run here uses it
  xla_flags.add_defaults(xla_flags.FAST_COMPILE, env)
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


def _saved(workdir) -> int:
  """How many complete checkpoints a stopped run left."""
  d = os.path.join(workdir, 'checkpoints')
  return sum(n.isdigit() for n in os.listdir(d)) if os.path.isdir(d) else 0


def cases(kills: int, length: float, rng: random.Random, points: str) -> list[tuple]:
  """(kind, fault flag or None, kill time or None) of each case.

  15 steps an epoch, then 2 validation batches: batch 3 and 7 mid-epoch, 15 the epoch's last
  step, 16 and 17 validation (the run has 34 batches); rename N is the N-th orbax commit (the
  checkpoints every 4 steps, at epoch ends and of the best weights), stopped mid-save.
  """
  out = [('kill -9', None, rng.uniform(0.15, 1.0) * length) for _ in range(kills)]
  sigs = {'INT': 'SIGINT', 'TERM': 'SIGTERM', 'KILL': 'kill -9'}
  for sig in points.split(',') if points else ():
    out += [(sigs[sig], f'--fault=batch:{n}:{sig}', None) for n in (3, 7, 15, 16, 17, 25)]
    out += [(sigs[sig], f'--fault=rename:{n}:{sig}', None) for n in (1, 2, 4)]
  return out


def sweep(outdir: str, kills: int, seed: int, points: str) -> None:
  rng = random.Random(seed)
  data_dir = os.path.join(outdir, 'tfds')
  t = time.time()
  assert run(os.path.join(outdir, 'ref'), data_dir) == 0
  length = time.time() - t
  want = outcome(os.path.join(outdir, 'ref'))
  rows = []
  for i, (kind, fault, after) in enumerate(cases(kills, length, rng, points)):
    w = os.path.join(outdir, f'case{i}')
    code = run(w, data_dir, *([fault] if fault else []), kill_after=after)
    saved = _saved(w)
    reruns = resume_until_done(w, data_dir)
    same = outcome(w) == want
    where = fault.removeprefix('--fault=') if fault else f'at {after:.1f}s'
    rows.append((kind, where, code, reruns, same))
    print(f'{kind:8s} {where:22s} exit {code:4d}, {saved} checkpoint(s) left, reruns {reruns}, '
          f'{"bit-identical" if same else "DIFFERENT"}', flush=True)
  print(f'{sum(r[4] for r in rows)} of {len(rows)} resumed runs bit-identical '
        f'(uninterrupted run {length:.0f}s)')


if __name__ == '__main__':
  if sys.argv[1] == '--sweep':
    opts = dict(a.removeprefix('--').split('=') for a in sys.argv[3:])
    sweep(sys.argv[2], int(opts.get('kills', 20)), int(opts.get('seed', 0)),
          opts.get('points', 'KILL,INT,TERM'))
  else:
    main(sys.argv)
