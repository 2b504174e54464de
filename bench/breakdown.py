"""Where the Context-LoRA C=8 train step spends its time over LoRA C=1 (issue 19, item 4).

    python -m bench.breakdown                      # paper shape; prints the section
    python -m bench.breakdown --out=BENCHMARKS.md  # and writes it there (bench.run keeps it)

Builds bench.run's train steps (bench/cases.py, under bench.run's XLA flags: the paper's LLM
shape, batch 8 x 128, bf16 compute, LoRA r=64 on every projection, Adam) for C=1 and C=8,
times them interleaved, then profiles `--steps` more steps of each with jax.profiler. Every
HLO op's own time (its span minus the ops it encloses, so a loop's body ops count as theirs,
not the loop's) is filed under a category read from the op's `op_name` metadata
(`categorize`). Figures are op time per step summed over the threads that ran the ops (two
threads can run ops at once, and a thread can wait), beside the step's median wall time.
Not a test: nothing asserts a time.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import tempfile
import time

from absl import app, flags

from cpeft_jax import xla_flags

# Our steps as train.py and bench.run time them (under its flags and malloc tunables).
xla_flags.set_training_defaults(restart=__name__ == '__main__')

import jax  # noqa: E402  (after the flags)

from bench import cases, harness  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum('shape', 'paper', list(cases.SHAPES), 'Decoder and batch shape.')
flags.DEFINE_list('contexts', ['1', '8'], 'The two context counts compared (first: the base).')
flags.DEFINE_integer('steps', 3, 'Timed steps per block (two rounds) and profiled steps.')
flags.DEFINE_integer('top', 0, 'Also print each category\'s N slowest ops per step (for digging).')
flags.DEFINE_string('out', '', 'A markdown file to write the section into (e.g. BENCHMARKS.md).')

HEADING = harness.BREAKDOWN_HEADING
CATEGORIES = ('optimizer', 'routing', 'lora tiles', 'lora permute', 'lora other', 'base',
              'no op_name')
MEANING = {
    'optimizer': 'ops outside the gradient: Adam over the tables, the update, gradient norm',
    'routing': '`adaptors.route`: the context ids sorted into groups (once per step)',
    'lora tiles': "the grouped strategy's tile loop: per-tile matmuls and the tables' "
                  'gradient accumulation (`_low_rank/while`)',
    'lora permute': 'tokens gathered into tile order and back (`_low_rank/jit(_take)`)',
    'lora other': "the rest of the adaptor: converts, C=1's plain LoRA matmuls",
    'base': 'everything else: frozen projections, attention, norms, the chunked loss',
    'no op_name': "ops XLA added with no source op: layout copies, the loops' zeroed buffers",
}
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="((?:[^"\\]|\\.)*)"')


def categorize(op_name: str) -> str:
  """The category of an HLO op from its op_name (see MEANING)."""
  if not op_name:
    return 'no op_name'
  if '/route/' in op_name:
    return 'routing'
  if '_low_rank/while' in op_name:
    return 'lora tiles'
  if '_low_rank/jit(_take)' in op_name:
    return 'lora permute'
  if '_low_rank' in op_name:
    return 'lora other'
  if op_name.startswith('state.') or (op_name.startswith('jit(') and 'jvp(' not in op_name):
    return 'optimizer'
  return 'base'


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name, for every instruction of the optimized HLO that has one."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def own_times(events) -> dict[str, float]:
  """Microseconds of each hlo_op's own time: per thread, its spans less the spans nested in
  them (a while loop's span holds its body's ops)."""
  by_tid = collections.defaultdict(list)
  for e in events:
    op = (e.get('args') or {}).get('hlo_op')
    if e.get('ph') == 'X' and op:
      by_tid[e.get('tid')].append((float(e['ts']), float(e.get('dur', 0.0)), op))
  own = collections.Counter()
  for spans in by_tid.values():
    spans.sort(key=lambda s: (s[0], -s[1]))
    stack = []  # (end, op)
    for ts, dur, op in spans:
      while stack and stack[-1][0] <= ts:
        stack.pop()
      if stack:
        own[stack[-1][1]] -= dur
      own[op] += dur
      stack.append((ts + dur, op))
  return own


def profile(run, steps: int) -> dict[str, float]:
  """Own microseconds per hlo_op over `steps` calls of `run`, from a jax.profiler trace."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        run()
    trace = next(pathlib.Path(d).rglob('*.trace.json.gz'))
    with gzip.open(trace) as f:
      data = json.load(f)
  return own_times(data['traceEvents'] if isinstance(data, dict) else data)


def by_category(own: dict[str, float], names: dict[str, str]) -> dict[str, float]:
  """The summed own time of each category's ops."""
  out = dict.fromkeys(CATEGORIES, 0.0)
  for op, us in own.items():
    out[categorize(names.get(op, ''))] += us
  return out


def main(argv):
  del argv
  shape = cases.SHAPES[FLAGS.shape]
  ctx = [int(c) for c in FLAGS.contexts]
  specs = {c: cases.TrainSpec(f'C={c}', contexts=c) for c in ctx}
  base = cases.init_base(shape)
  built = {c: cases.build_ours(specs[c], shape, base) for c in ctx}
  times = harness.interleave({c: b.run for c, b in built.items()}, FLAGS.steps)
  started = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
  rows, raw = {}, {}
  for c, b in built.items():
    names = op_names(b.compiled.as_text())
    own = profile(b.run, FLAGS.steps)
    raw[c] = (own, names)
    rows[c] = {k: us / FLAGS.steps / 1e3 for k, us in by_category(own, names).items()}
  c0, c1 = ctx
  total = {c: sum(rows[c].values()) for c in ctx}
  extra = total[c1] - total[c0]
  lines = [
      HEADING, '',
      f'- command: `python -m bench.breakdown --shape={FLAGS.shape}`',
      f'- date: {started}; machine: {harness.cpu_model()}, {harness.cores()} cores; load '
      f'average {harness.load_average()}',
      f'- shape: {shape.describe()}',
      f'- step: bench.run\'s (bf16 compute, Adam); C={c1}: contiguous equal segments, strategy '
      f'{shape.strategy}; wall: median of 2 rounds x {FLAGS.steps} steps; op time: '
      f'{FLAGS.steps} profiled steps, each op\'s own time per step summed over threads',
      '',
      f'| category (op time per step) | C={c0} ms | C={c1} ms | extra ms | share of the extra |',
      '|---|---|---|---|---|']
  for k in CATEGORIES:
    d = rows[c1][k] - rows[c0][k]
    share = f'{d / extra:+.0%}' if extra else '-'
    lines.append(f'| {k}: {MEANING[k]} | {rows[c0][k]:.0f} | {rows[c1][k]:.0f} | {d:+.0f} | '
                 f'{share} |')
  lines.append(f'| all ops (both threads) | {total[c0]:.0f} | {total[c1]:.0f} | {extra:+.0f} | '
               f'{total[c1] / total[c0]:.2f}x |')
  wall = (times[c1] - times[c0]) * 1e3
  lines.append(f'| step wall time | {times[c0] * 1e3:.0f} | {times[c1] * 1e3:.0f} | '
               f'{wall:+.0f} | {times[c1] / times[c0]:.2f}x |')
  text = '\n'.join(lines) + '\n'
  print(text)
  if FLAGS.top:  # op names differ between the two compiles: each step's own list
    for c, (own, names) in raw.items():
      by_cat = collections.defaultdict(collections.Counter)
      for op, us in own.items():
        name = names.get(op, '')
        by_cat[categorize(name)][f'{op} {name[-100:]}'] += us / FLAGS.steps / 1e3
      for k in CATEGORIES:
        print(f'# C={c}, {k}: top {FLAGS.top} ops (own ms per step, summed over threads)')
        for op, ms in by_cat[k].most_common(FLAGS.top):
          print(f'{ms:8.1f}  {op}')
  if FLAGS.out:
    harness.write_section(FLAGS.out, HEADING, text)


if __name__ == '__main__':
  app.run(main)
