"""Smoke test of the benchmark command: its smallest run finishes and reports every row.

No timing is asserted (speed lives in bench/). To stay fast on 2 cores it runs one timed step
per case, compiles with XLA's cheap backend settings and leaves out the PyTorch peer, which it
says in the report (the peer's parity is checked by a full `python -m bench.run`).
"""

import os
import subprocess
import sys

from bench import cases
from cpeft_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_prints_every_row(tmp_path):
  out = tmp_path / 'BENCHMARKS.md'
  env = dict(os.environ)
  xla_flags.add_defaults(xla_flags.FAST_COMPILE, env)
  p = subprocess.run(
      [sys.executable, '-m', 'bench.run', '--quick', '--steps=1', '--rounds=1', '--nopeer',
       '--norss', f'--out={out}'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  print(p.stderr[-1500:])  # the skip of the peer is said there and in the report
  text = out.read_text()
  assert text == p.stdout.strip() + '\n'
  assert 'transformers + peft peer skipped: --nopeer' in p.stderr
  table = [l for l in text.splitlines() if l.startswith('| ')]
  for spec in cases.OURS.values():
    row = next(l for l in table if l.startswith(f'| {spec.label} |'))
    ms = float(row.split('|')[3])
    assert ms > 0, row
  for label in cases.PEERS.values():
    assert f'| {label} | skipped (--nopeer) |' in text
  assert '| ours: generate_text (jitted while_loop) |' in text
  goals = [l for l in table if l.endswith(' met |') or l.endswith(' not measured |')]
  assert len(goals) == 7, goals  # bench/run.py GOAL_ROWS

