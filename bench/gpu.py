"""The GPU suite: train steps with MFU, the three LoRA strategies, transformers + peft on CUDA.

    python -m bench.run --suite=gpu                # the first GPU JAX finds, within ~8 minutes
    python -m bench.run --suite=gpu --gpu_dry_run  # the same code on CPU at the quick shape

On the first of `jax.devices('gpu')` it builds our train steps (LoRA C=1, Context-LoRA C=2, full
fine-tuning; bf16 compute, bench/cases.py) at the paper's LLM shape with a batch that keeps a GPU
busy (--gpu_batch x --gpu_seq), the LoRA step at C = 2, 4, 8 under each strategy (onehot, grouped,
ragged; the one `pick_strategy('auto', ...)` takes marked); times them all together
(bench/harness.py's alternating blocks and medians); then, in a process of its own (its JAX on
CPU, so that two CUDA stacks never share a process), transformers + peft LoRA in bf16 autocast
where torch sees CUDA. It reports ms / step, tokens / s and MFU (bench/flops.py). Compiling and
timing stop at --gpu_budget_s: what is left is reported as skipped; a case that fails to
build (a kernel the GPU lacks, memory) is reported as failed and the others go on.

The report replaces the section '## GPU suite' of --out and nothing else in that file. Without
a GPU the suite says what it looked for, writes nothing and exits with status 2. The dry run
exists to test this code on a machine without one; its figures are CPU figures, printed only
unless --out is given.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import importlib
import json
import os
import shlex
import subprocess
import sys
import time

from absl import flags

from bench import cases, flops, harness

HEADING = '## GPU suite'
TRAIN_CASES = ('lora_c1', 'lora_c2', 'full')
STRATEGIES = ('onehot', 'grouped', 'ragged')
CONTEXTS = (2, 4, 8)
PEER = 'peft_bf16'
# JAX takes 75% of GPU memory at its first use by default; the peer's torch needs some too.
JAX_MEMORY_FRACTION = '0.6'
# Seconds of the budget kept for the peer's process (imports, weights, compile-free torch steps).
PEER_RESERVE_S = 90.0

FLAGS = flags.FLAGS
flags.DEFINE_bool('gpu_dry_run', False, 'With --suite=gpu: run the GPU suite on CPU at the quick '
                  'shape (to test it without a GPU; no GPU figures).')
flags.DEFINE_integer('gpu_batch', 32, 'GPU suite: train batch (dry run: the quick shape\'s).')
flags.DEFINE_integer('gpu_seq', 256, 'GPU suite: sequence length (dry run: the quick shape\'s).')
flags.DEFINE_integer('gpu_steps', 10, 'GPU suite: timed steps per block, at most.')
flags.DEFINE_integer('gpu_rounds', 2, 'GPU suite: rounds of alternating blocks, at most.')
flags.DEFINE_float('gpu_budget_s', 400.0, 'GPU suite: seconds after which compiling and timing '
                   'stop (what is left is reported as skipped), so the suite ends within 8 min.')
flags.DEFINE_list('gpu_contexts', [str(c) for c in CONTEXTS], 'GPU suite: the C of the LoRA '
                  'strategies table (the tests\' dry run takes one).')
flags.DEFINE_bool('gpu_peer_worker', False, 'Internal: build and time the peer, print JSON.')
flags.DEFINE_float('gpu_peak_tflops', None, 'GPU suite: the device\'s dense bf16 peak in TFLOP/s '
                   '(default: bench/flops.py\'s table by device kind).')


class NoGpu(RuntimeError):
  """No GPU for the suite."""


def log(msg):
  print(f'[bench gpu {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def find_device(dry_run: bool):
  """The first GPU JAX sees (the first CPU device for a dry run); NoGpu saying what was tried."""
  import jax
  if dry_run:
    return jax.devices('cpu')[0]
  try:
    return jax.devices('gpu')[0]
  except RuntimeError as e:
    raise NoGpu(f"no GPU found: jax.devices('gpu') raised \"{e}\". The GPU suite needs JAX with "
                'CUDA (e.g. pip install "jax[cuda12]") on a machine with an NVIDIA GPU; '
                '--gpu_dry_run runs it on CPU at a tiny shape.') from e


def peer_figures(s: cases.Shape, steps: int, rounds: int, dry_run: bool) -> dict:
  """Builds and times transformers + peft LoRA (bf16 autocast) at shape `s` on CUDA (on CPU in
  a dry run): its figures, or {'skip': why}. Meant for a process of its own (`peer_worker`)."""
  try:
    import torch
    for name in ('transformers', 'peft'):
      importlib.import_module(name)
  except ImportError as e:
    return {'skip': f'not installed: {e}'}
  info = {'torch': torch.__version__, 'cuda': torch.version.cuda}
  if torch.cuda.is_available():
    device = 'cuda'
    info['device_name'] = torch.cuda.get_device_name(0)
  elif dry_run:
    device = 'cpu'
  else:
    return {'skip': f'no CUDA torch (torch {torch.__version__}: '
                    'torch.cuda.is_available() is False)'}
  built = cases.build_peer(cases.hf_model(s, cases.init_base(s)), s, (PEER,), device=device)
  b = built[PEER]
  t = harness.interleave({PEER: b.run}, steps, rounds)[PEER]
  return dict(info, device=device, seconds=t, first_loss=b.first_loss, trainable=b.trainable)


def peer_worker(dry_run: bool) -> int:
  """The peer's own process: prints 'PEER {json}' of `peer_figures` at the suite's shape."""
  s = suite_shape(dry_run, 'auto', 64)
  out = peer_figures(s, FLAGS.gpu_steps, FLAGS.gpu_rounds, dry_run)
  print(f'PEER {json.dumps(out)}', flush=True)
  return 0


def measure_peer(seconds_left: float, steps: int, rounds: int) -> dict:
  """The peer's figures from `peer_worker` in a fresh process, or {'skip': why}."""
  if seconds_left <= 0:
    return {'skip': 'time budget'}
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # its JAX only makes the weights
  cmd = [sys.executable, '-m', 'bench.run', '--suite=gpu', '--gpu_peer_worker',
         f'--gpu_dry_run={FLAGS.gpu_dry_run}', f'--gpu_steps={steps}', f'--gpu_rounds={rounds}']
  cmd += [f'--{k}={FLAGS[k].value}' for k in ('gpu_batch', 'gpu_seq') if FLAGS[k].present]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                       timeout=seconds_left)
  except subprocess.TimeoutExpired:
    return {'skip': f'time budget (the peer\'s process ran past {seconds_left:.0f} s)'}
  for line in p.stdout.splitlines():
    if line.startswith('PEER '):
      return json.loads(line[len('PEER '):])
  tail = ' '.join(p.stderr.strip().splitlines()[-3:])[-300:]
  return {'skip': f'failed (exit {p.returncode}): {tail}'}


def suite_shape(dry_run: bool, strategy: str, tile: int) -> cases.Shape:
  """The paper's LLM shape with the GPU batch; the quick shape for a dry run (its own batch
  unless --gpu_batch / --gpu_seq are given)."""
  s = cases.SHAPES['quick' if dry_run else 'paper']
  batch = FLAGS.gpu_batch if (FLAGS['gpu_batch'].present or not dry_run) else s.batch
  seq = FLAGS.gpu_seq if (FLAGS['gpu_seq'].present or not dry_run) else s.seq
  return dataclasses.replace(s, batch=batch, seq=seq, strategy=strategy, tile=tile)


@dataclasses.dataclass(frozen=True)
class Case:
  """One timed row: a train spec at a LoRA strategy, and its model FLOPs per step."""
  key: str
  label: str
  spec: cases.TrainSpec
  strategy: str
  flops: int


def contexts() -> tuple[int, ...]:
  """The C of the strategies table: --gpu_contexts once flags are parsed, else CONTEXTS."""
  if not flags.FLAGS.is_parsed():
    return CONTEXTS
  return tuple(int(c) for c in flags.FLAGS.gpu_contexts)


def plan(s: cases.Shape, platform: str) -> tuple[list[Case], dict[int, str]]:
  """Every case of the suite, and the strategy 'auto' picks at each C on `platform`."""
  from cpeft_jax.adaptors import pick_strategy
  out = []
  for name in TRAIN_CASES:
    spec = cases.OURS[name]
    out.append(Case(name, spec.label, spec, s.strategy, flops.train_flops(s, spec.mode)))
  auto = {}
  for C in contexts():
    spec = cases.TrainSpec(f'LoRA C={C}', contexts=C)
    auto[C] = pick_strategy('auto', spec.peft(s).num_rows, s.rank, platform)
    for strategy in STRATEGIES:
      out.append(Case(f'c{C}_{strategy}', f'{spec.label}, {strategy}', spec, strategy,
                      flops.train_flops(s, 'peft')))
  return out, auto


def build_all(device, s: cases.Shape, todo: list[Case], deadline: float, jobs: int):
  """({key: Built}, {key: why it failed}) of the cases begun before `deadline`
  (time.monotonic()) on `device`, `jobs` at a time."""
  import jax
  with jax.default_device(device):
    base = cases.init_base(s)
    frozen16 = cases.frozen_base(cases.OURS['lora_c1'], s, base)  # the bf16 PEFT cases share it

  def build(case):
    if time.monotonic() > deadline:
      return case.key, None, None
    t0 = time.perf_counter()
    shape = dataclasses.replace(s, strategy=case.strategy)
    frozen = None if case.spec.mode == 'full' else frozen16
    try:
      with jax.default_device(device):  # thread-local: each thread says it again
        b = cases.build_ours(case.spec, shape, base, frozen=frozen)
    except Exception as e:  # noqa: BLE001  (reported in its row; the other cases go on)
      why = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]
      log(f'{case.key} failed: {why}')
      return case.key, None, why
    log(f'built {case.key} in {time.perf_counter() - t0:.1f} s')
    return case.key, b, None
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    results = list(pool.map(build, todo))
  return ({k: b for k, b, _ in results if b is not None},
          {k: why for k, _, why in results if why is not None})


def fit_steps(runs: dict, seconds_left: float, steps: int, rounds: int) -> tuple[int, int]:
  """(steps, rounds), at most the given ones, whose timing should end within `seconds_left`:
  one probe call of each case estimates a round (steps + 1 calls per case)."""
  probe = 0.0
  for run in runs.values():
    t0 = time.perf_counter()
    run()
    probe += time.perf_counter() - t0
  while rounds > 1 and rounds * (steps + 1) * probe > seconds_left:
    rounds -= 1
  fit = int(seconds_left / max(rounds * probe, 1e-9)) - 1
  return max(1, min(steps, fit)), rounds


def measure(device, dry_run: bool, peer: bool, strategy: str, tile: int, jobs: int) -> dict:
  """Builds and times every case on `device`, then the peer; the report's inputs."""
  clock0 = time.monotonic()
  deadline = clock0 + FLAGS.gpu_budget_s
  s = suite_shape(dry_run, strategy, tile)
  todo, auto = plan(s, device.platform)
  log(f'{device.device_kind}: {len(todo)} cases, batch {s.batch} x seq {s.seq}, {jobs} at a time')
  # Half the budget for compiling: timing and the peer need the rest.
  built, failed = build_all(device, s, todo, clock0 + FLAGS.gpu_budget_s / 2, jobs)
  runs = {k: b.run for k, b in built.items()}
  left = deadline - time.monotonic() - (PEER_RESERVE_S if peer else 0)
  steps, rounds = fit_steps(runs, left, FLAGS.gpu_steps, FLAGS.gpu_rounds)
  log(f'timing {len(runs)} cases: {rounds} rounds x {steps} steps')
  times = harness.interleave(runs, steps, rounds,
                             on_block=lambda k, t: log(f'{k}: {t * 1e3:.2f} ms'))
  peer_out = measure_peer(deadline - time.monotonic(), steps, rounds) if peer else {
      'skip': '--nopeer'}
  log(f'peer: {peer_out}')
  return dict(shape=s, device=device, cases=todo, auto=auto, built=built, failed=failed,
              times=times, steps=steps, rounds=rounds, peer=peer_out, dry_run=dry_run,
              budget_s=FLAGS.gpu_budget_s, elapsed=time.monotonic() - clock0)


# ----------------------------------------------------------------------------- report


def _perf(flop: int, t: float | None, tokens: int, peak: float | None) -> str:
  """'ms | tokens/s | TFLOP | TFLOP/s | MFU' cells of one timed case."""
  if t is None:
    return '- | - | - | - | -'
  m = flops.mfu(flop, t, peak)
  return (f'{t * 1e3:.2f} | {tokens / t:,.0f} | {flop / 1e12:.3f} | {flop / t / 1e12:.1f} | '
          f'{"-" if m is None else f"{m * 100:.1f}%"}')


def header_lines(r: dict, started) -> list[str]:
  s, dev, peak = r['shape'], r['device'], r['peak']
  dry = ('- **dry run** (--gpu_dry_run): the suite\'s code on CPU at the quick shape, to test '
         'it; these are not GPU figures' if r['dry_run'] else None)
  p = r['peer']
  torch_line = (f'; the peer\'s torch {p["torch"]}, CUDA {p["cuda"]}, on {p["device_name"]}'
                if p.get('device') == 'cuda' else '')
  lines = [
      HEADING, '',
      f'- command: `python -m bench.run {shlex.join(sys.argv[1:])}`',
      f'- date: {started:%Y-%m-%d %H:%M} UTC; suite time {r["elapsed"]:.0f} s (budget '
      f'{r["budget_s"]:.0f} s for compiling and timing)',
      f'- device: {dev.device_kind} (JAX platform {dev.platform}, the first of its devices); '
      + (f'dense bf16 peak {peak:g} TFLOP/s ({r["peak_from"]})' if peak is not None else
         'not in bench/flops.py\'s peak table: FLOP/s reported, MFU not (pass '
         '--gpu_peak_tflops)'),
      f'- versions: Python {sys.version.split()[0]}, {harness.versions()}{torch_line}',
      f'- shape: Llama decoder width {s.width}, {s.layers} layers, {s.heads} heads, SwiGLU '
      f'{s.ffn} (separate gate/up), vocab {s.vocab}; train batch {s.batch} x seq {s.seq} '
      f'(T = {s.batch * s.seq} tokens); LoRA r={s.rank} on q/k/v/o/gate/up/down; bf16 '
      'compute, bf16 frozen weights, full fine-tuning with float32 master weights; Adam',
      f'- timing: median of {r["rounds"]} rounds x {r["steps"]} timed steps per case, in '
      'blocks alternating between all cases below (order reversed every round), each block '
      'after one untimed step; every step waits for its loss on the host. The peer: as many '
      'steps, timed alone in its own process after ours',
      f'- MFU = model FLOPs per step / step time / dense bf16 peak, with {flops.FORMULA} '
      '(bench/flops.py)',
  ]
  return lines[:2] + ([dry] if dry else []) + lines[2:]


def report(r: dict, started) -> str:
  """The '## GPU suite' section (markdown) of the measurements `r` (`measure`'s, with the
  device's 'peak' bf16 TFLOP/s or None and 'peak_from', where that figure comes from)."""
  lines = header_lines(r, started) + train_lines(r, r['peak']) + strategy_lines(r, r['peak'])
  return '\n'.join(lines) + '\n'


def train_lines(r: dict, peak: float | None) -> list[str]:
  """The train step table: our three cases and the peer, with MFU."""
  s, built, times = r['shape'], r['built'], r['times']
  tokens = s.batch * s.seq
  lines = ['', '### Train step', '', '| case | trainable params | ms / step | tokens / s | '
            'model TFLOP / step | TFLOP/s | MFU |', '|---|---|---|---|---|---|---|']
  by_key = {c.key: c for c in r['cases']}
  for key in TRAIN_CASES:
    c = by_key[key]
    if key not in built:
      lines.append(f'| {c.label} | {not_run(r, key)} | - | - | - | - | - |')
      continue
    lines.append(f'| {c.label} | {built[key].trainable:,} | '
                 f'{_perf(c.flops, times[key], tokens, peak)} |')
  p = r['peer']
  label = cases.PEERS[PEER] + (f' (torch {p["device"]})' if 'device' in p else '')
  if 'seconds' not in p:
    lines.append(f'| {label} | peer skipped: {p["skip"]} | - | - | - | - | - |')
    return lines
  lines.append(f'| {label} | {p["trainable"]:,} | '
               f'{_perf(by_key["lora_c1"].flops, p["seconds"], tokens, peak)} |')
  if 'lora_c1' in built:
    lines += ['', f'Our LoRA C=1 step over the peer\'s: {times["lora_c1"] / p["seconds"]:.3f}x. '
              f'First-step loss (LoRA B = 0), bf16: ours {built["lora_c1"].first_loss:.4f}, '
              f'the peer {p["first_loss"]:.4f}.']
  return lines


def not_run(r: dict, key: str) -> str:
  """The cell that says why case `key` has no figures."""
  why = r['failed'].get(key)
  return f'failed: {why}' if why else 'skipped (time budget)'
def strategy_lines(r: dict, peak: float | None) -> list[str]:
  """The LoRA strategies table: each C under each strategy, against LoRA C=1 of the same run."""
  built, times, s = r['built'], r['times'], r['shape']
  ref = times.get('lora_c1')
  Cs = sorted({c.spec.contexts for c in r['cases'] if c.key not in TRAIN_CASES})
  lines = ['', f'### LoRA strategies (C = {", ".join(map(str, Cs))})', '',
           f'Context-LoRA train step at each C, contexts in contiguous segments of each row; '
           f'"auto" marks what `pick_strategy(\'auto\', C, r={s.rank}, '
           f'\'{r["device"].platform}\')` takes. MFU counts the same model FLOPs for every '
           'strategy (each token\'s own rank-r pair).', '',
           '| C | strategy | ms / step | vs LoRA C=1 | MFU | auto |', '|---|---|---|---|---|---|']
  for c in r['cases']:
    if c.key in TRAIN_CASES:
      continue
    C = c.spec.contexts
    mark = 'auto' if r['auto'][C] == c.strategy else ''
    if c.key not in built:
      lines.append(f'| {C} | {c.strategy} | {not_run(r, c.key)} | - | - | {mark} |')
      continue
    t = times[c.key]
    m = flops.mfu(c.flops, t, peak)
    lines.append(f'| {C} | {c.strategy} | {t * 1e3:.2f} | '
                 f'{f"{t / ref:.2f}x" if ref else "-"} | '
                 f'{"-" if m is None else f"{m * 100:.1f}%"} | {mark} |')
  return lines


# ----------------------------------------------------------------------------- main


def main(out: str, peer: bool, strategy: str, tile: int, jobs: int | None) -> int:
  """Runs the suite and writes its section into `out` (empty: print only); exit status."""
  if FLAGS.gpu_peer_worker:
    return peer_worker(FLAGS.gpu_dry_run)
  started = datetime.datetime.now(datetime.timezone.utc)
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', JAX_MEMORY_FRACTION)
  try:
    device = find_device(FLAGS.gpu_dry_run)
  except NoGpu as e:
    print(f'bench.run --suite=gpu: {e} Nothing written.', file=sys.stderr, flush=True)
    return 2
  if FLAGS.gpu_dry_run and not FLAGS['out'].present:
    out = ''  # CPU figures never land in BENCHMARKS.md unless asked for by name
  r = measure(device, FLAGS.gpu_dry_run, peer, strategy, tile, jobs or min(4, harness.cores()))
  r['peak'], r['peak_from'] = FLAGS.gpu_peak_tflops, '--gpu_peak_tflops'
  if r['peak'] is None:
    r['peak'], r['peak_from'] = flops.peak_bf16_tflops(device.device_kind), 'bench/flops.py'
  text = report(r, started)
  print(text)
  if out:
    harness.write_section(out, HEADING, text)
    log(f'wrote the section {HEADING!r} of {out}')
  total = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
  log(f'elapsed: {r["elapsed"]:.0f} s building and timing, {total:.0f} s since the suite began')
  return 0
