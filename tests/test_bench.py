"""The benchmark command: its smallest runs finish and report every row; the GPU suite's parts.

No timing is asserted (speed lives in bench/). To stay fast on 2 cores the runs take one timed
step per case, compile with XLA's cheap backend settings and leave out the PyTorch peer, which
they say in the report (the peer's parity is checked by a full `python -m bench.run`; the GPU
suite's peer path by `test_peer_figures_on_cpu`). The GPU suite (bench/gpu.py) runs here as its
dry run: the same code on CPU at the quick shape.
"""

import dataclasses
import math
import os
import subprocess
import sys
import types

import pytest

from bench import cases, flops, gpu, harness
from cpeft_jax import xla_flags
from cpeft_jax.adaptors import pick_strategy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_prints_every_row(tmp_path):
  out = tmp_path / 'BENCHMARKS.md'
  kept = '## GPU suite\n\nkept\n'  # the GPU suite's section: the CPU report keeps it
  out.write_text('# Old report\n\n' + kept)
  env = dict(os.environ)
  xla_flags.add_defaults(xla_flags.FAST_COMPILE, env)
  p = subprocess.run(
      [sys.executable, '-m', 'bench.run', '--quick', '--steps=1', '--rounds=1', '--nopeer',
       '--norss', f'--out={out}'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  print(p.stderr[-1500:])  # the skip of the peer is said there and in the report
  text = out.read_text()
  assert text == p.stdout.strip() + '\n\n' + kept
  assert 'transformers + peft peer skipped: --nopeer' in p.stderr
  table = [l for l in text.splitlines() if l.startswith('| ')]
  for spec in cases.OURS.values():
    row = next(l for l in table if l.startswith(f'| {spec.label} |'))
    ms = float(row.split('|')[3])
    assert ms > 0, row
  for label in cases.PEERS.values():
    assert f'| {label} | skipped (--nopeer) |' in text
  gen = next(l for l in table if l.startswith('| ours: generate_text (jitted while_loop, '
                                                 'weights from generate.prepare) |'))
  call, _, prefill, step, _ = (float(c.replace(',', '')) for c in gen.split('|')[2:7])
  # One timed call each at this tiny shape: under a loaded machine the 1-token call can take
  # longer than the whole one, so only their signs are checked, not their order.
  assert prefill > 0 and call > 0 and math.isfinite(step), gen
  assert '| transformers generate(use_cache=True) | skipped (--nopeer) |' in text
  # A one-token step reads every float32 weight but the input embedding table.
  s = cases.SHAPES['quick']
  D, F, V, N = s.width, s.ffn, s.vocab, s.layers
  weights = N * (4 * D * D + 3 * D * F + 2 * D) + D + V * D
  assert f'it reads {4 * weights / 2**20:,.1f} MiB of float32 weights' in text
  goals = [l for l in table if l.endswith(' met |') or l.endswith(' not measured |')]
  assert len(goals) == 7, goals  # bench/run.py GOAL_ROWS



# ----------------------------------------------------------------------------- the GPU suite


def test_train_flops_against_a_hand_count():
  """Every matmul of a 2-layer model, B=1, S=3 (T=3), D=4, F=8, V=10, r=2, counted one by one."""
  s = cases.Shape('hand', vocab=10, width=4, layers=2, heads=2, ffn=8, batch=1, seq=3, rank=2)
  T, D, F, V, r = 3, 4, 8, 10, 2
  mm = lambda i, o: 2 * T * i * o  # one [T, i] @ [i, o]
  layer = 4 * mm(D, D) + 2 * mm(D, F) + mm(F, D)  # q k v o; gate up; down
  head = mm(D, V)
  assert layer == 960 and head == 240
  forward = 2 * layer + head
  # Backward through the frozen weights: an input gradient per matmul (same count), except the
  # first layer's q, k, v, whose input (the frozen embeddings) needs none.
  input_grads = forward - 3 * mm(D, D)
  attention = 2 * (2 * (2 * 1 * 3 * 3 * D)) * 3  # QK^T and PV per layer: forward, then 2x back
  assert attention == 864
  lora_pair = lambda i, o: mm(i, r) + mm(r, o)  # x A, then (x A) B
  lora_fwd = 2 * (4 * lora_pair(D, D) + 2 * lora_pair(D, F) + lora_pair(F, D))
  lora = 3 * lora_fwd - 3 * mm(D, r)  # forward, input and weight grads; no first q/k/v x-grads
  assert flops.train_flops(s, 'peft') == forward + input_grads + attention + lora == 9648
  assert flops.train_flops(s, 'peft', lora=False) == forward + input_grads + attention
  assert flops.train_flops(s, 'full') == 3 * forward + attention == 7344  # + weight grads
  assert flops.lora_params_per_token(s) == 2 * r * (4 * (D + D) + 2 * (D + F) + (F + D))
  with pytest.raises(ValueError, match="mode='lora'"):
    flops.train_flops(s, 'lora')


def test_train_flops_against_xla_cost_analysis():
  """XLA's own count of the compiled train step (one layer: it counts a scanned layer once) is
  the model count plus a few percent of element-wise work, for a frozen base and for full FT."""
  s = cases.Shape('xla', vocab=1024, width=256, layers=1, heads=4, ffn=1024, batch=4, seq=64,
                  rank=16)
  base = cases.init_base(s)
  for name in ('lora_c1', 'full'):
    spec = cases.OURS[name]
    xla = cases.build_ours(spec, s, base).compiled.cost_analysis()['flops']
    ratio = xla / flops.train_flops(s, spec.mode)
    assert 1.0 <= ratio <= 1.06, (name, ratio)


def test_peak_table_and_mfu():
  assert flops.peak_bf16_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert flops.peak_bf16_tflops('NVIDIA H100 PCIe') == 756.0
  assert flops.peak_bf16_tflops('NVIDIA H200') == 989.0
  assert flops.peak_bf16_tflops('NVIDIA A100-SXM4-40GB') == 312.0
  assert flops.peak_bf16_tflops('NVIDIA L4') == 121.0
  assert flops.peak_bf16_tflops('NVIDIA L40S') == 362.0
  assert flops.peak_bf16_tflops('NVIDIA A10G') is None  # not the A10's figure
  assert flops.peak_bf16_tflops('cpu') is None
  assert flops.mfu(494.5e12, 1.0, 989.0) == pytest.approx(0.5)
  assert flops.mfu(1e12, 1.0, None) is None


def test_replace_section_keeps_every_other_byte():
  head, tail = '# T\n\n## A\n\na\n\n', '## C\n\nc\n'
  text = head + '## GPU suite\n\nold\n\n### sub\n\nold too\n\n' + tail
  new = '## GPU suite\n\nnew\n\n### sub\n\nx\n'
  assert harness.section(text, '## GPU suite') == '## GPU suite\n\nold\n\n### sub\n\nold too\n\n'
  assert harness.replace_section(text, '## GPU suite', new) == head + new + '\n' + tail
  assert harness.replace_section(head + tail, '## GPU suite', new) == head + tail + '\n' + new
  assert harness.replace_section('', '## GPU suite', new) == new
  assert harness.section(head + tail, '## GPU suite') is None
  with pytest.raises(ValueError, match='must start with the line'):
    harness.replace_section(text, '## GPU suite', '## Other\n')


def _fake_measurements():
  """`gpu.measure`'s output for an H100 at the paper shape: lora_c1 at 40% MFU, full FT not
  built (the budget), one strategy failed, the peer skipped."""
  s = dataclasses.replace(cases.SHAPES['paper'], batch=32, seq=256)
  todo, auto = gpu.plan(s, 'gpu')
  built = {c.key: cases.Built(None, 7) for c in todo if c.key not in ('full', 'c8_ragged')}
  t1 = flops.train_flops(s, 'peft') / (0.4 * 989e12)
  times = {k: t1 * (1 + 0.1 * i) for i, k in enumerate(built)}
  return dict(shape=s, device=types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3',
                                                    platform='gpu'),
              cases=todo, auto=auto, built=built, failed={'c8_ragged': 'XlaRuntimeError: oom'},
              times=times, steps=10, rounds=2, peer={'skip': 'no CUDA torch (test)'},
              dry_run=False, budget_s=400.0, elapsed=12.0, peak=989.0, peak_from='bench/flops.py')


def test_gpu_report_rows():
  import datetime
  text = gpu.report(_fake_measurements(), datetime.datetime(2026, 1, 1))
  rows = {l.split(' | ')[0][2:]: l for l in text.splitlines() if l.startswith('| ')}
  assert text.startswith(gpu.HEADING + '\n') and flops.FORMULA in text
  assert 'dense bf16 peak 989 TFLOP/s (bench/flops.py)' in text and 'dry run' not in text
  assert rows[cases.OURS['lora_c1'].label].endswith('| 40.0% |')
  # c2_onehot: the third built case, 1.2x lora_c1's time, so 40% / 1.2 MFU
  assert '| 2 | onehot | ' in text and ' | 1.20x | 33.3% | auto |' in text
  assert rows[cases.OURS['full'].label].startswith(
      f"| {cases.OURS['full'].label} | skipped (time budget) |")
  assert f"| {cases.PEERS['peft_bf16']} | peer skipped: no CUDA torch (test) |" in text
  assert '| 8 | ragged | failed: XlaRuntimeError: oom | - | - | auto |' in text
  marks = [l for l in text.splitlines() if l[2:3].isdigit() and l.endswith('| auto |')]
  assert [l.split(' | ')[:2] for l in marks] == [['| 2', 'onehot'], ['| 4', 'ragged'],
                                                 ['| 8', 'ragged']]  # r=64: 2 x 64 <= 128


def test_gpu_suite_without_a_gpu_writes_nothing(tmp_path):
  out = tmp_path / 'BENCHMARKS.md'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  p = subprocess.run([sys.executable, '-m', 'bench.run', '--suite=gpu', f'--out={out}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "no GPU found: jax.devices('gpu') raised" in p.stderr
  assert not out.exists()


def test_peer_figures_on_cpu():
  """The GPU suite's peer path (bench/cases.py build_peer on a torch device), on CPU torch."""
  pytest.importorskip('peft')
  s = cases.SHAPES['quick']
  out = gpu.peer_figures(s, steps=1, rounds=1, dry_run=True)
  assert out['device'] == 'cpu' and out['seconds'] > 0, out
  assert out['trainable'] == flops.lora_params_per_token(s)
  assert abs(out['first_loss'] - math.log(s.vocab)) < 0.5, out  # random model: about ln V
  import torch
  if not torch.cuda.is_available():
    assert gpu.peer_figures(s, 1, 1, dry_run=False)['skip'].startswith('no CUDA torch')


def test_gpu_suite_dry_run_writes_only_its_section(tmp_path):
  """The whole suite on CPU: a stale GPU section in the middle of a copy of BENCHMARKS.md is
  replaced by one with every row and the FLOP formula; every other byte stays."""
  original = open(os.path.join(ROOT, 'BENCHMARKS.md')).read()
  original = original.replace(harness.section(original, gpu.HEADING) or '\0', '')
  cut = original.index('\n## ', original.index('## Train step')) + 1
  before, after = original[:cut], original[cut:]
  out = tmp_path / 'BENCHMARKS.md'
  out.write_text(before + '## GPU suite\n\nstale\n\n' + after)
  env = dict(os.environ)
  xla_flags.add_defaults(xla_flags.FAST_COMPILE, env)
  p = subprocess.run(
      [sys.executable, '-m', 'bench.run', '--suite=gpu', '--gpu_dry_run', '--gpu_steps=1',
       '--gpu_rounds=1', '--gpu_peak_tflops=1', '--gpu_contexts=4', '--nopeer', f'--out={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  text = out.read_text()
  section = harness.section(text, gpu.HEADING)
  assert text == before + section + after and 'stale' not in text
  assert section.rstrip('\n') == p.stdout.strip()
  assert '**dry run**' in section and flops.FORMULA in section
  rows = [l for l in section.splitlines() if l.startswith('| ')]
  for key in gpu.TRAIN_CASES:
    row = next(l for l in rows if l.startswith(f'| {cases.OURS[key].label} |'))
    assert float(row.split(' | ')[2]) > 0 and row.endswith('% |'), row
  assert f"| {cases.PEERS['peft_bf16']} | peer skipped: --nopeer |" in section
  assert '### LoRA strategies (C = 4)' in section
  for C in (4,):  # one C: each row is a compile, and the rows of every C are built alike
    auto = pick_strategy('auto', C, cases.SHAPES['quick'].rank, 'cpu')
    for strategy in gpu.STRATEGIES:
      row = next(l for l in rows if l.startswith(f'| {C} | {strategy} | '))
      assert float(row.split(' | ')[2]) > 0, row
      assert row.endswith('| auto |') == (strategy == auto), row


def test_breakdown_files_each_op_under_its_source():
  """bench/breakdown.py: an op's own time excludes the ops nested in its span (a loop's body),
  per thread; the op_names JAX writes into a grouped Context-LoRA decoder's optimized HLO land
  in the routing, tile-loop and base categories (a renamed scope would leave them empty)."""
  from bench import breakdown
  from cpeft_jax.adaptors import LoraConfig, PeftConfig
  from cpeft_jax.models.decoder_config import DecoderConfig
  from cpeft_jax.models.llama import Decoder
  import jax
  import jax.numpy as jnp

  ev = lambda tid, ts, dur, op: {'ph': 'X', 'tid': tid, 'ts': ts, 'dur': dur,
                                 'args': {'hlo_op': op}}
  own = breakdown.own_times([ev(1, 0, 10, 'while'), ev(1, 1, 3, 'dot'), ev(1, 5, 2, 'add'),
                             ev(2, 0, 3, 'dot'), {'ph': 'X', 'tid': 1, 'ts': 0, 'dur': 99,
                                                  'name': 'no hlo_op: not an op'}])
  assert own == {'while': 5.0, 'dot': 6.0, 'add': 2.0}
  cfg = DecoderConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                      intermediate_size=32)
  peft = PeftConfig(methods=('lora',), num_contexts=3, lora=LoraConfig(rank=2, alpha=2.0),
                    strategy='grouped', tile=4)
  model = Decoder(cfg, peft)
  tokens, ctx = jnp.zeros((2, 8), jnp.int32), jnp.asarray([[0, 1, 2, 1] * 2] * 2)
  variables = model.init(jax.random.key(0), tokens, context_ids_BL=ctx)
  hlo = jax.jit(lambda v: model.apply(v, tokens, context_ids_BL=ctx)).lower(
      variables).compile().as_text()
  found = {breakdown.categorize(n) for n in breakdown.op_names(hlo).values()}
  assert {'routing', 'lora tiles', 'base'} <= found, found
  assert breakdown.categorize('') == 'no op_name'
  assert breakdown.categorize('jit(train_step)/add') == 'optimizer'
