"""The benchmark command: train step and generation speed and memory, ours against the peer.

    python -m bench.run                   # the paper's LLM shape (<= ~15 min on 2 CPU cores)
    python -m bench.run --quick           # a small shape (well under a minute)
    python -m bench.run --out=            # print only, write no file
    python -m bench.run --suite=gpu       # the GPU suite (bench/gpu.py): its own section only

Prints one markdown report and writes it to --out (BENCHMARKS.md): train step time, tokens/s
and memory per case, generation tokens/s, the first-step loss parity with the peer, and the
project's goals, each met or not with its ratio. Timing: see bench/harness.py (alternating
blocks, medians, ratios within the run). Memory: each case again in a fresh process (peak RSS,
which includes the compiler's and runtime's own use), plus XLA's own account of the compiled
step's buffers. Not a test: nothing asserts a time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

from cpeft_jax import xla_flags

# Our train steps run as train.py runs them: under the XLA flags and, restarted, the glibc malloc
# tunables it sets. Generation runs in a process of its own in the user's environment, as
# evaluate.py does; so do the peer's train steps (see cpeft_jax/xla_flags.py).
USER_XLA_FLAGS = os.environ.get('XLA_FLAGS')  # (read again after the restart)
xla_flags.set_training_defaults(restart=__name__ == '__main__')

from bench import cases, gpu, harness  # noqa: E402  (starts JAX, after the flags)

FLAGS = flags.FLAGS
flags.DEFINE_enum('suite', 'cpu', ['cpu', 'gpu'], 'cpu: this report (the whole --out file but '
                  'its GPU section); gpu: bench/gpu.py, only its section of --out.')
flags.DEFINE_bool('quick', False, 'The small shape instead of the paper\'s LLM shape.')
flags.DEFINE_string('out', 'BENCHMARKS.md', 'Markdown file to write; empty: print only.')
flags.DEFINE_integer('steps', None, 'Timed calls per block (default: 3, quick: 2).')
flags.DEFINE_integer('rounds', 2, 'Rounds of alternating blocks.')
flags.DEFINE_bool('peer', True, 'Also time transformers + peft (PyTorch).')
flags.DEFINE_bool('rss', None, 'Measure each case\'s peak RSS in a fresh process '
                  '(default: yes, except with --quick).')
flags.DEFINE_integer('jobs', 2, 'Cases compiled (and memory processes run) at a time.')
flags.DEFINE_list('cases', list(cases.OURS), 'Our train cases to run.')
flags.DEFINE_string('strategy', 'auto', 'LoRA strategy of the multi-context cases (a knob).')
flags.DEFINE_integer('tile', 64, 'Tokens per tile of the grouped LoRA strategy (a knob).')
flags.DEFINE_bool('remat', False, 'Rematerialise each decoder layer in the backward pass (every '
                  'case alike): activation memory falls, so the optimizer state shows.')
flags.DEFINE_enum('frozen_dtype', 'compute', ['compute', 'float32'],
                  'Storage of the PEFT cases\' frozen weights (a knob; see cases.Shape).')
flags.DEFINE_string('memory_case', None, 'Internal: build one case, step twice, print its RSS.')
flags.DEFINE_bool('generation_worker', False, 'Internal: time generation, print it as JSON.')
flags.DEFINE_bool('peer_worker', False, 'Internal: build the peer\'s train steps, run one per '
                  'case name read from stdin.')

# Memory-only cases: a train case with layer remat (measured in a fresh process, not timed).
REMAT = '+remat'
REMAT_CASES = ('lora_c2', 'full')

GOAL_ROWS = (
    # (label, numerator, denominator, bound, kind) with kind 'time' (<= bound) or
    # 'memory'/'speed' (>= bound).
    ('Context-LoRA C=2 over context-agnostic LoRA', 'lora_c2', 'lora_c1', 1.10, 'time'),
    ('Context-LoRA C=8 over C=1', 'lora_c8', 'lora_c1', 1.25, 'time'),
    ('our LoRA step over transformers+peft, bf16', 'lora_c1', 'peft_bf16', 0.85, 'time'),
    ('our LoRA step over transformers+peft, float32', 'lora_c1_fp32', 'peft_fp32', 0.70, 'time'),
    ('full fine-tuning over Context-LoRA C=2, peak memory', 'full', 'lora_c2', 2.0, 'memory'),
    ('the same, both with layer remat', 'full' + REMAT, 'lora_c2' + REMAT, 2.0, 'memory'),
    ('our generation over transformers\' generate, tokens/s', 'generate_ours', 'generate_peer',
     2.0, 'speed'),
)


def log(msg):
  print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def shape() -> cases.Shape:
  s = cases.SHAPES['quick' if FLAGS.quick else 'paper']
  return dataclasses.replace(s, strategy=FLAGS.strategy, tile=FLAGS.tile,
                             frozen_dtype=FLAGS.frozen_dtype, remat=FLAGS.remat)


# ----------------------------------------------------------------------------- memory


def memory_worker(name: str):
  """Builds case `name` alone in this fresh process, runs two steps, prints its RSS as JSON.
  A name ending in REMAT is that train case with layer remat."""
  s = shape()
  case = name[:-len(REMAT)] if name.endswith(REMAT) else name
  if case != name:
    s = dataclasses.replace(s, remat=True)
  if name in cases.PEERS:
    import peft  # noqa: F401  (imports before the baseline, like the JAX side's)
    import torch  # noqa: F401
    import transformers  # noqa: F401
  base_mib = harness.current_rss_mib()
  if name in cases.PEERS:
    built = cases.build_peer(cases.hf_model(s), s, variants=(name,))[name]
  else:
    spec = cases.OURS[case]
    if spec.mode == 'full':
      base, frozen = cases.init_base(s), None
    else:  # the case holds only what a user's run would: its frozen weights, in their dtype
      dtype = spec.dtype if s.frozen_dtype == 'compute' else 'float32'
      base, frozen = None, cases.init_base(s, dtype=dtype)
    built = cases.build_ours(spec, s, base, share_base=False, frozen=frozen)
  built.run()
  built.run()
  print('MEMORY ' + json.dumps({'case': name, 'base_mib': base_mib, 'xla_mib': built.xla_mib,
                                'peak_mib': harness.peak_rss_mib()}), flush=True)


def generation_worker():
  """Times our generation and (with --peer) transformers' generate, prints them as JSON."""
  s = shape()
  base = cases.init_base(s)
  built, info = cases.build_generation(s, base, cases.hf_model(s, base) if FLAGS.peer else None)
  times = harness.interleave({k: b.run for k, b in built.items()}, FLAGS.steps, FLAGS.rounds)
  print('GENERATION ' + json.dumps({'times': times, 'info': info}), flush=True)


def user_env() -> dict[str, str]:
  """The environment the user started bench.run in: their XLA flags, no added tunables."""
  env = xla_flags.user_environ()
  env.pop('XLA_FLAGS', None)
  if USER_XLA_FLAGS is not None:
    env['XLA_FLAGS'] = USER_XLA_FLAGS
  return env


def peer_worker():
  """Builds the peer's train steps (transformers + peft, on our base weights), prints their
  figures as JSON, then runs one step of each case named on a line of stdin, answering DONE."""
  s = shape()
  built = cases.build_peer(cases.hf_model(s, cases.init_base(s)), s)
  print('PEERS ' + json.dumps({n: {'trainable': b.trainable, 'first_loss': b.first_loss}
                               for n, b in built.items()}), flush=True)
  for line in sys.stdin:
    built[line.strip()].run()
    print('DONE', flush=True)


class PeerProcess:
  """The peer's train steps in a process of their own, started in the user's environment
  (`user_env`): PyTorch runs as a user's would, without the malloc tunables that train.py (and
  so this process) sets, which slow it (cpeft_jax/xla_flags.py). `built` holds a case per peer
  whose `run()` has the worker run one step and waits for it, so that `harness.interleave`
  alternates its blocks with ours as before; the worker idles meanwhile."""

  def __init__(self):
    cmd = [sys.executable, '-m', 'bench.run', '--peer_worker'] + (['--quick'] if FLAGS.quick
                                                                   else [])
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=user_env())
    info = json.loads(self._read('PEERS '))
    self.built = {n: cases.Built(lambda n=n: self._step(n), v['trainable'],
                                 first_loss=v['first_loss']) for n, v in info.items()}

  def _read(self, tag: str) -> str:
    for line in self.proc.stdout:
      if line.startswith(tag):
        return line[len(tag):]
    raise RuntimeError(f'The peer process ended (exit {self.proc.wait()}) before printing '
                       f'{tag.strip()!r}; its stderr is above.')

  def _step(self, name: str):
    self.proc.stdin.write(name + '\n')
    self.proc.stdin.flush()
    self._read('DONE')

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def worker(args: list[str], tag: str, env=None) -> tuple[dict | None, str]:
  """Runs `python -m bench.run ARGS` in a fresh process: (the JSON it printed after TAG, '')
  or, if it printed none, (None, why)."""
  cmd = [sys.executable, '-m', 'bench.run', *args] + (['--quick'] if FLAGS.quick else [])
  p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  for line in p.stdout.splitlines():
    if line.startswith(tag + ' '):
      return json.loads(line[len(tag) + 1:]), ''
  return None, f'exit {p.returncode}: {p.stderr[-3000:]}'


def measure_generation(peer: bool) -> tuple[dict, dict]:
  """(times, info) of `generation_worker`, run under the user's own XLA flags."""
  out, why = worker(['--generation_worker', f'--peer={peer}', f'--steps={FLAGS.steps}',
                     f'--rounds={FLAGS.rounds}'], 'GENERATION', user_env())
  if out is None:
    raise RuntimeError(f'The generation process failed ({why})')
  return out['times'], out['info']


def measure_memory(names, jobs: int = 2) -> dict[str, dict]:
  """Peak RSS per case, each in a fresh process (two at a time: no timing runs meanwhile)."""
  def one(name):
    out, why = worker([f'--memory_case={name}', f'--strategy={FLAGS.strategy}',
                       f'--tile={FLAGS.tile}', f'--frozen_dtype={FLAGS.frozen_dtype}',
                       f'--remat={FLAGS.remat}'], 'MEMORY',
                      user_env() if name in cases.PEERS else None)
    if out is None:
      log(f'memory of {name} failed ({why})')
    return name, out
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    return {n: m for n, m in pool.map(one, names) if m is not None}


# ----------------------------------------------------------------------------- report


def ratio_verdict(value: float, bound: float, kind: str) -> str:
  ok = value <= bound if kind == 'time' else value >= bound
  return 'met' if ok else 'not met'


def report(s, built, times, mem, gen_info, gen_times, peer_skip, started, load_start) -> str:
  tokens = s.batch * s.seq
  lines = [
      '# Benchmarks',
      '',
      f'- command: `python -m bench.run {shlex.join(sys.argv[1:])}`',
      f'- date: {started:%Y-%m-%d %H:%M} UTC; wall time {time.time() - started.timestamp():.0f} s',
      f'- machine: {harness.cpu_model()}, {harness.cores()} cores used of {os.cpu_count()}; '
      'load average (1/5/15 min) '
      f'{load_start} at start, {harness.load_average()} at end (other work on the machine '
      'inflates absolute times; ratios are taken within this run)',
      f'- versions: Python {sys.version.split()[0]}, {harness.versions()}',
      f'- shape ({s.name}): {s.describe()}',
      f'- timing: median of {FLAGS.rounds} rounds x {FLAGS.steps} timed steps per case, in '
      'blocks that alternate between cases (order reversed every round), each block after one '
      'untimed step',
      '- train step: next-token loss over the caption positions, Adam (0.9, 0.95), lr 1e-4; '
      'compute bf16 unless marked float32; frozen weights as the shape says, full '
      'fine-tuning with float32 master weights; no dropout. "no adaptors": '
      'only a D x D linear map on the image positions\' input embeddings trains (the paper\'s '
      'projection-only baseline), so the backward pass still crosses every layer',
      ('- memory: peak RSS not measured (pass --rss); XLA MiB as below' if not mem else
       '- memory: "peak RSS" = the case alone in a fresh process (imports, weights, optimizer, '
      'compilation, two steps); "XLA MiB" = arguments + outputs + temporaries of the compiled '
      'step, from XLA\'s memory analysis'),
  ]
  if peer_skip:
    lines.append(f'- peer: skipped ({peer_skip})')
  ref = times.get('lora_c1')
  lines += ['', '## Train step', '',
            '| case | trainable params | ms / step | tokens / s | vs LoRA C=1 | XLA MiB | '
            'peak RSS MiB (over imports) |', '|---|---|---|---|---|---|---|']
  for name in list(FLAGS.cases) + list(cases.PEERS):
    label = cases.OURS[name].label if name in cases.OURS else cases.PEERS[name]
    if name not in built:
      lines.append(f'| {label} | skipped ({peer_skip}) | - | - | - | - | - |')
      continue
    b, t = built[name], times[name]
    rel = f'{t / ref:.2f}x' if ref else '-'
    xla = f'{b.xla_mib:.0f}' if b.xla_mib is not None else '-'
    m = mem.get(name)
    rss = f"{m['peak_mib']:.0f} ({m['peak_mib'] - m['base_mib']:.0f})" if m else '-'
    lines.append(f'| {label} | {b.trainable:,} | {t * 1e3:.1f} | {tokens / t:,.0f} | {rel} | '
                 f'{xla} | {rss} |')
  remat_rows = [n for n in mem if n.endswith(REMAT)]
  if remat_rows:
    lines += ['', 'With layer remat (each layer\'s activations recomputed in the backward pass; '
              'memory only, not timed):', '', '| case | XLA MiB | peak RSS MiB (over imports) |',
              '|---|---|---|']
    for name in remat_rows:
      m = mem[name]
      lines.append(f"| {cases.OURS[name[:-len(REMAT)]].label}, remat | {m['xla_mib']:.0f} | "
                   f"{m['peak_mib']:.0f} ({m['peak_mib'] - m['base_mib']:.0f}) |")
  first = {n: b.first_loss for n, b in built.items()}
  if first.get('lora_c1_fp32') is not None and first.get('peft_fp32') is not None:
    lines += ['', f"First-step loss (LoRA B = 0, so the frozen model's loss), float32: ours "
              f"{first['lora_c1_fp32']:.6f}, transformers+peft {first['peft_fp32']:.6f} "
              f"(|diff| {abs(first['lora_c1_fp32'] - first['peft_fp32']):.1e})."]
  figures = {n: times[n] for n in times}
  if gen_times:
    lines += ['', '## Generation (greedy, KV cache)', '',
              '| stack | ms / call | new tokens / s | prefill ms (the call for 1 new token) | '
              'ms / further step | weights read per step, GB/s |', '|---|---|---|---|---|---|']
    for who, label in (('ours',
                        'ours: generate_text (jitted while_loop, weights from generate.prepare)'),
                       ('peer', 'transformers generate(use_cache=True)')):
      name = f'generate_{who}'
      if name not in gen_times:
        lines.append(f'| {label} | skipped ({peer_skip}) | - | - | - | - |')
        continue
      figures[name] = gen_info[f'tokens_{who}'] / gen_times[name]
      prefill = gen_times[f'prefill_{who}']
      step = (gen_times[name] - prefill) / max(gen_info[f'steps_{who}'], 1)
      lines.append(f'| {label} | {gen_times[name] * 1e3:.1f} | {figures[name]:,.0f} | '
                   f'{prefill * 1e3:.1f} | {step * 1e3:.1f} | '
                   f"{gen_info['step_weight_bytes'] / step / 1e9:.1f} |")
    lines += ['', 'A further step feeds one token per row through every layer and the LM head: '
              f"it reads {gen_info['step_weight_bytes'] / 2**20:,.1f} MiB of float32 weights "
              '(all but the input embedding table), so its time is bound by how fast the '
              "machine's memory and the matmul kernels stream them; the prefill is compute-bound."]
    if 'generate_peer' in gen_times:
      lines += ['', f"Same generated tokens in both stacks: {gen_info['same_tokens']} "
                f"({gen_info['tokens_ours']} tokens ours, {gen_info['tokens_peer']} theirs)."]
  lines += ['', '## Goals (ratios within this run)', '', '| goal | ratio | bound | verdict |',
            '|---|---|---|---|']
  for label, num, den, bound, kind in GOAL_ROWS:
    sign = '<=' if kind == 'time' else '>='
    for row, a, b in goal_figures(label, num, den, kind, figures, built, mem):
      if a is None or b is None:
        lines.append(f'| {row} | - | {bound} | not measured |')
      else:
        lines.append(f'| {row} | {a / b:.3f}x | {sign} {bound} | '
                     f'{ratio_verdict(a / b, bound, kind)} |')
  return '\n'.join(lines) + '\n'


def goal_figures(label, num, den, kind, figures, built, mem):
  """[(row label, numerator, denominator)] of one goal. A memory goal has a row for the peak
  RSS (where measured: the whole process, as a CPU user sees it) and one for XLA's figure
  (arguments + outputs + temporaries: what the step holds in an accelerator's memory)."""
  if kind != 'memory':
    return [(label, figures.get(num), figures.get(den))]
  xla = lambda n: mem[n]['xla_mib'] if n in mem else getattr(built.get(n), 'xla_mib', None)
  rows = [(label + ' (peak RSS)', mem[num]['peak_mib'], mem[den]['peak_mib'])] if (
      num in mem and den in mem) else []
  return rows + [(label + ' (XLA MiB)', xla(num), xla(den))]


# Sections other commands write into the same file, kept as they are by this report.
KEPT_SECTIONS = ('## Input pipeline (data.workers)', gpu.HEADING, harness.BREAKDOWN_HEADING)


def write(path: str, text: str):
  """Writes the report `text` to `path`, keeping the sections of `KEPT_SECTIONS` there."""
  old = open(path).read() if os.path.exists(path) else ''
  for heading in KEPT_SECTIONS:
    kept = harness.section(old, heading)
    if kept is not None:
      text = harness.replace_section(text, heading, kept)
  with open(path, 'w') as f:
    f.write(text)


# ----------------------------------------------------------------------------- main


def main(argv):
  del argv
  if FLAGS.suite == 'gpu':
    return gpu.main(FLAGS.out, FLAGS.peer, FLAGS.strategy, FLAGS.tile,
                    FLAGS.jobs if FLAGS['jobs'].present else None)
  if FLAGS.steps is None:
    FLAGS.steps = 2 if FLAGS.quick else 3
  if FLAGS.memory_case:
    return memory_worker(FLAGS.memory_case)
  if FLAGS.generation_worker:
    return generation_worker()
  if FLAGS.peer_worker:
    return peer_worker()
  unknown = sorted(set(FLAGS.cases) - set(cases.OURS))
  if unknown:
    raise app.UsageError(f'--cases names {unknown}; expected some of {list(cases.OURS)}.')
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = harness.load_average()
  s = shape()
  log(f'shape {s.name}: {s.describe()}')
  base = cases.init_base(s)
  frozen16 = cases.frozen_base(cases.OURS['lora_c1'], s, base)  # shared by the bf16 PEFT cases

  peer_skip = ''
  if FLAGS.peer:
    try:
      import peft  # noqa: F401
      import torch  # noqa: F401
    except ImportError as e:
      peer_skip = f'not installed: {e}'
  else:
    peer_skip = '--nopeer'
  if peer_skip:
    log(f'transformers + peft peer skipped: {peer_skip}')

  log('generation: timing in a process of its own')
  gen_times, gen_info = measure_generation(not peer_skip)
  log(f'generation: {gen_times} {gen_info}')

  def build(name):
    t0 = time.perf_counter()
    spec = cases.OURS[name]
    b = cases.build_ours(spec, s, base, frozen=frozen16 if spec.dtype == 'bfloat16' else None)
    log(f'built {name} in {time.perf_counter() - t0:.1f} s')
    return name, b
  # Compiling is mostly single-threaded: two cases at a time halve the wait on 2 cores.
  with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
    built = dict(pool.map(build, FLAGS.cases))
  peer = None
  if not peer_skip:
    peer = PeerProcess()
    built.update(peer.built)
    log('built the peer (in a process of its own)')
  times = harness.interleave({k: b.run for k, b in built.items()}, FLAGS.steps, FLAGS.rounds,
                             on_block=lambda k, t: log(f'{k}: {t * 1e3:.1f} ms'))
  mem = {}
  rss = (not FLAGS.quick) if FLAGS.rss is None else FLAGS.rss
  if rss and FLAGS.out:  # the timings so far, in case the memory phase is cut short
    write(FLAGS.out, report(s, built, times, mem, gen_info, gen_times, peer_skip, started,
                            load_start))
  if peer is not None:
    peer.close()
  if rss:
    log(f'memory: {len(built)} fresh processes')
    extra = [] if FLAGS.remat else [n + REMAT for n in REMAT_CASES if n in built]
    mem = measure_memory(list(built) + extra, FLAGS.jobs)
  else:
    log('memory: peak RSS not measured (--norss, the default with --quick)')
  text = report(s, built, times, mem, gen_info, gen_times, peer_skip, started, load_start)
  print(text)
  if FLAGS.out:
    write(FLAGS.out, text)
    log(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
