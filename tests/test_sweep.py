"""The sweep runner on a 2-cell, 1-epoch tiny demo grid (finishes, tabulates both cells, skips
finished cells, resumes an interrupted one), and its findings on hand-made numbers."""

import json
import math
import os
import signal

import pytest

from cpeft_jax import experiment
from cpeft_jax.sweep import report, runner
from cpeft_jax.train import trainer
from helpers import demo as demo_config

GRID = ['method=lora,rank=2,contexts=agnostic', 'method=lora,rank=2,contexts=modality']
INTERRUPT_AT = 3  # the second cell's training batch that brings SIGINT (of 30 in its epoch)


def tiny_config(arg):
  """The demo config shrunk to seconds (as tests/test_demo.py's two-variant run)."""
  c = demo_config.get_config('epochs=1,num_train=48,pretrain_epochs=0,vision_epochs=2,' + arg)
  c.data.demo.update(image_size=32, num_validation=8, num_test=2)
  c.data.seq_len = 48  # BOS + 16 image tokens + up to 30 caption tokens + EOS
  c.vision.update(image_size=32, patch_size=8)  # the config as given; stage 0's tower replaces it
  c.pretrain.vision.update(image_size=32, patch_size=8, hidden_size=48, num_layers=1,
                           num_heads=2, intermediate_size=64, batch_size=16)
  c.model.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
  c.train.update(batch_size=8, log_every=5, checkpoint_every=0, export=False)
  c.eval.batch_size = 8
  c.optim.update(warmup_steps=2, learning_rate=3e-3)
  return c


@pytest.fixture(scope='module')
def sweep(tmp_path_factory, request):
  """The first cell run alone, then both with SIGINT during the second cell's training, then
  both again: (workdir, cells, results, the step the second cell resumed from)."""
  workdir = str(tmp_path_factory.mktemp('sweep'))
  cells = runner.cells_of(GRID)
  runner.run(tiny_config, cells[:1], [0], workdir, command='first')
  mp = pytest.MonkeyPatch()
  request.addfinalizer(mp.undo)
  calls, real = [0], experiment.device_batch

  def device_batch(exp, batch):
    calls[0] += 1
    if calls[0] == INTERRUPT_AT:
      os.kill(os.getpid(), signal.SIGINT)
    return real(exp, batch)
  mp.setattr(experiment, 'device_batch', device_batch)
  with pytest.raises(SystemExit, match='Stopped by signal'):
    runner.run(tiny_config, cells, [0], workdir, command='interrupted')
  mp.undo()
  assert not os.path.exists(os.path.join(runner.cell_dir(workdir, cells[1], 0), runner.RESULT))
  resumed, real_resume = [], trainer.Trainer.resume

  def resume(self):
    real_resume(self)
    resumed.append(int(self.state.step))
  mp.setattr(trainer.Trainer, 'resume', resume)
  results = runner.run(tiny_config, cells, [0], workdir, command='python -m cpeft_jax.sweep x')
  mp.undo()
  return workdir, cells, results, resumed


def test_sweep_finishes_and_tabulates_both_cells(sweep):
  workdir, cells, results, _ = sweep
  assert [r['cell'] for r in results] == ['lora_2_agnostic', 'lora_2_modality']
  text = open(os.path.join(workdir, 'RESULTS.md')).read()
  assert text.startswith('# Sweep results\n\nCommand: `python -m cpeft_jax.sweep x`')
  for cell, r in zip(cells, results):
    run_dir = runner.cell_dir(workdir, cell, 0)
    best = json.load(open(os.path.join(run_dir, 'best.json')))
    # Evaluating the best weights gives back the validation perplexity training kept.
    assert math.isclose(r['val_ppl'], math.exp(best['val_loss']), rel_tol=1e-4)
    assert r['steps'] == 30 and r['seed'] == 0  # 48 images x 5 captions, batch 8
    assert set(r['metrics']) >= {'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr'}
    assert (r['method'], r['targets']) == ('LoRA r=2', 'AF')
    assert f'| {cell.name} | 0 | {r["trainable_params"]:,} | {r["val_ppl"]:.3f} ± 0.000 |' in text
    # Both cells loaded the one stage 0 of the sweep.
    run_config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert run_config['text_model'] == os.path.join(workdir, 'base_lm')
    assert run_config['vision']['path'] == os.path.join(workdir, 'base_vision')
  assert [r['contexts'] for r in results] == ['agnostic', 'specific']
  row = next(line for line in text.splitlines() if line.startswith('| LoRA r=2 |'))
  assert row.endswith(f'| {results[0]["val_ppl"]:.3f} ± 0.000 | {results[1]["val_ppl"]:.3f} '
                      '± 0.000 |')  # Table 1's AF agnostic, AF specific
  # Context-specific LoRA holds one more table per projection: q k v o, gate up, down.
  D, F, r, L = 32, 64, 2, 1
  extra = results[1]['trainable_params'] - results[0]['trainable_params']
  assert extra == L * r * (4 * (D + D) + 2 * (D + F) + (F + D))


def test_interrupted_cell_resumed_from_its_saved_step(sweep):
  *_, results, resumed = sweep
  assert resumed == [INTERRUPT_AT]  # the second cell restarted at step 3, not at 0
  assert results[1]['steps'] == 30


def test_rerun_skips_finished_cells(sweep, monkeypatch):
  workdir, cells, results, _ = sweep
  files = [os.path.join(runner.cell_dir(workdir, c, 0), runner.RESULT) for c in cells]
  stamps = [os.stat(f).st_mtime_ns for f in files]
  monkeypatch.setattr(trainer, 'train_and_evaluate',
                      lambda *a: pytest.fail('a finished cell trained again'))
  assert runner.run(tiny_config, cells, [0], workdir, command='again') == results
  assert [os.stat(f).st_mtime_ns for f in files] == stamps


def test_cell_names_and_selection():
  cells = runner.cells_of(['method=ia3,targets=A', 'method=none,mode=full'])
  assert [c.name for c in cells] == ['ia3_A', 'none_full']
  assert runner.select(cells, ['*_A']) == cells[:1]
  with pytest.raises(ValueError, match=r"pattern 'lora\*' matches no cell; the grid has"):
    runner.select(cells, ['lora*'])
  with pytest.raises(ValueError, match="would share the name 'ia3_A'"):
    runner.cells_of(['method=ia3,targets=A', 'targets=ia3,method=A'])
  with pytest.raises(ValueError, match='--seeds'):
    runner.parse_seeds('0,0')


def test_demo_grid_is_the_papers():
  cells = [demo_config.get_config(a) for a in demo_config.grid()]
  described = [runner.describe(c) for c in cells]
  keys = {(d['method'], d['targets'], d['contexts']) for d in described}
  assert len(cells) == len(keys) == 32
  assert keys >= {(m, t, x) for m in report.PAPER_METHODS for t in report.TARGETS
                  for x in report.CONTEXTS}
  assert {(report.PROJECTION_ONLY, '', ''), (report.FULL, '', '')} <= keys


def _results(ppl):
  """Result dicts (two seeds a cell) from {(method, targets, contexts): (seed 0, seed 1) PPL}."""
  return [{'cell': '_'.join(filter(None, k)), 'seed': s, 'method': k[0], 'targets': k[1],
           'contexts': k[2], 'val_ppl': v, 'metrics': {'CIDEr': 1.0 / v}, 'steps': 10,
           'trainable_params': 1, 'seconds': 60.0, 'encoder': 'e'}
          for k, vs in ppl.items() for s, v in enumerate(vs)]


def _paper_like(order=1.0):
  """Every cell of the paper's grid; PPL falls with the adaptor's strength, AF < F < A,
  specific = agnostic - 0.2; each cell's two seeds 0.02 apart."""
  out = {}
  for i, m in enumerate(report.PAPER_METHODS):
    for j, t in enumerate(('AF', 'F', 'A')):
      for x, d in (('agnostic', 0.0), ('specific', -0.2)):
        v = 20.0 - order * 2.0 * i + 0.5 * j + d
        out[(m, t, x)] = (v - 0.01, v + 0.01)
  out[(report.PROJECTION_ONLY, '', '')] = (30.0, 30.0)
  out[(report.FULL, '', '')] = (12.5, 12.9)
  return out


def test_findings_hold_on_paper_like_numbers():
  ppl = report.stats(_results(_paper_like()), lambda r: r['val_ppl'])
  assert ppl[('IA3', 'A', 'agnostic')] == report.Stat(21.0, 20.99, 21.01, 2)
  found = report.findings(ppl)
  assert [f.verdict for f in found] == ['holds'] * 5
  assert [len(f.comparisons) for f in found] == [15, 20, 24, 31, 1]
  # specific vs agnostic: every gap 0.2 against a spread of 0.01 + 0.01.
  assert found[0].line().startswith(
      '- Context-specific below context-agnostic in every cell: **holds**. 15 of 15 '
      'comparisons hold, 15 by more than the seed spread; smallest gap +0.200 PPL')
  assert 'against a seed spread of 0.020' in found[0].line()
  # LoRA-64 AF specific is 20 - 8 - 0.2 = 11.8 against full fine-tuning's 12.7 ± 0.2.
  c = found[4].comparisons[0]
  assert math.isclose(c.gap, 0.9) and math.isclose(c.spread, 0.21) and c.separated


def test_findings_fail_and_partial_sweeps():
  numbers = _paper_like(order=-1.0)  # IA3 best, LoRA-64 worst: the chain fails everywhere
  numbers[('BitFit', 'F', 'specific')] = (25.0, 25.0)  # above agnostic's 22.49 .. 22.51
  found = report.findings(report.stats(_results(numbers), lambda r: r['val_ppl']))
  assert [f.verdict for f in found] == ['does not hold', 'holds', 'does not hold', 'holds',
                                        'does not hold']
  line = found[0].line()
  assert '14 of 15 comparisons hold' in line
  assert 'fails: BitFit F specific vs BitFit F agnostic (-2.500 ± 0.010)' in line
  assert '1 of 24 comparisons hold' in found[2].line()  # LoRA r=1 F below BitFit's 25
  # A partial sweep: only what is measured is compared, and the verdict says so.
  partial = {k: v for k, v in _paper_like().items() if k[0] == 'IA3'}
  found = report.findings(report.stats(_results(partial), lambda r: r['val_ppl']))
  assert [f.verdict for f in found] == ['holds so far (3 of 15 measured)',
                                        'holds so far (4 of 20 measured)', 'not measured yet',
                                        'not measured yet', 'not measured yet']


def test_results_markdown_tables():
  text = report.markdown(_results(_paper_like()), command='cmd', wall_seconds=90.0,
                         runs_total=64)
  lines = text.splitlines()
  assert 'Wall time: 1.5 min in this invocation; the 64 finished cell x seed runs (64 of 64)' \
      in text
  assert '| IA3 | 21.000 ± 0.010 | 20.800 ± 0.010 | 20.500 ± 0.010 | 20.300 ± 0.010 | ' \
      '20.000 ± 0.010 | 19.800 ± 0.010 |' in lines  # Table 1: A, F, AF x agnostic, specific
  row = next(line for line in lines if line.startswith('| full fine-tuning | – | 12.700 ± 0.200'))
  assert row.endswith(f'| {(1 / 12.5 + 1 / 12.9) / 2:.3f} ± {(1 / 12.5 - 1 / 12.9) / 2:.3f} |')
  assert sum(line.startswith('- ') for line in lines) == 5
  assert '| LoRA r=64_AF_specific | 0,1 | 1 | 11.800 ± 0.010 |' in text


def test_paper_grid_cells_by_encoder():
  module = runner.load_config_module(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                  'paper.py'))
  cells = runner.grid_cells(module, 'paper')
  assert len(cells) == 64 and cells[-1].name == 'full_large'
  described = [runner.describe(module.get_config(c.arg)) for c in cells]
  for enc in ('swinv2-tiny', 'swinv2-large'):
    keys = {(d['method'], d['targets'], d['contexts']) for d in described if enc in d['encoder']}
    assert len(keys) == 32 and ('LoRA r=64', 'AF', 'specific') in keys
  with pytest.raises(ValueError, match=r'has no grid_coarse\(\)'):
    runner.grid_cells(module, 'coarse')
