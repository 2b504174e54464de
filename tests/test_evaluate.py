"""evaluate.py: perplexity of a trained workdir equals training's validation; generated captions
cover every image once with COCO metrics and heatmaps; the comparison table; clear errors."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo  # noqa: E402
from cpeft_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from cpeft_jax.evaluation import captioning, compare, perplexity  # noqa: E402
from cpeft_jax import runs  # noqa: E402
from cpeft_jax.train import checkpointing, trainer  # noqa: E402
from cpeft_jax.train import state as state_lib  # noqa: E402
from helpers import tiny  # noqa: E402

TINY_ARG = 'epochs=1,num_train=24,rank=4,pretrain_epochs=2,contexts=modality'  # a single run


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """One trained epoch (15 steps; checkpoints at steps 14 and 15, best at 15)."""
  path = str(tmp_path_factory.mktemp('evaluate') / 'run')
  trainer.train_and_evaluate(tiny(1), path)
  return path


def _best_json(workdir):
  with open(os.path.join(workdir, 'best.json')) as f:
    return json.load(f)


def test_best_validation_perplexity_is_trainings(workdir):
  out = perplexity.evaluate(tiny(1), workdir, splits=['validation', 'test'], progress=False)
  best = _best_json(workdir)
  val = out['splits']['validation']
  np.testing.assert_allclose(val['perplexity'], math.exp(best['val_loss']), rtol=1e-5)
  np.testing.assert_allclose(val['loss'], best['val_loss'], rtol=1e-5)
  # The version best.json commits (DIR/best is only a local convenience link to it).
  assert out['checkpoint'] == {
      'kind': 'best', 'path': os.path.join(workdir, 'best_versions', str(best['step'])),
      'step': best['step']}
  test = out['splits']['test']
  assert test['images'] == 100 and val['images'] == 8
  assert math.isfinite(test['perplexity']) and test['perplexity'] != val['perplexity']


def test_latest_checkpoint(workdir):
  out = perplexity.evaluate(tiny(1), workdir, checkpoint='latest', progress=False)
  assert out['checkpoint']['kind'] == 'latest' and out['checkpoint']['step'] == 15
  # One epoch: the latest step is the best one.
  np.testing.assert_allclose(out['splits']['validation']['loss'],
                             _best_json(workdir)['val_loss'], rtol=1e-5)


def test_restores_trainable_tree_of_a_step_as_checkpointing_does(workdir):
  with ocp.StandardCheckpointer() as ckpt:
    best = ckpt.restore(os.path.join(workdir, 'best'))
  managed = os.path.join(workdir, 'checkpoints')
  mine = runs.restore_trainable(runs.Checkpoint('latest', managed, 14),
                                      jax.tree.map(ocp.utils.to_shape_dtype_struct, best))
  optim = state_lib.OptimConfig.from_dict(tiny(1).optim)
  state = state_lib.TrainState.create(best, state_lib.optimizer(optim))
  with checkpointing.manager(managed) as mgr:
    ref, _ = checkpointing.restore(mgr, state, step=14)
  jax.tree.map(np.testing.assert_array_equal, mine, ref.trainable)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, mine, best)))  # step 14 != 15


@pytest.mark.parametrize('change, named', [
    (lambda c: c.peft.lora.update(rank=8, alpha=8.0), 'peft.lora.rank=4 vs 8'),
    (lambda c: c.peft.update(methods=('ia3',)), "peft.methods=['lora'] vs ['ia3']"),
], ids=['rank', 'methods'])
def test_config_that_does_not_fit_the_checkpoint(workdir, change, named):
  config = tiny(1)
  change(config)
  with pytest.raises(runs.CheckpointMismatch, match='does not fit') as e:
    perplexity.evaluate(config, workdir, config_name='configs/x.py', progress=False)
  msg = str(e.value)
  assert os.path.join(workdir, 'best') in msg and 'configs/x.py' in msg and named in msg
  assert 'k_proj/lora_a' in msg


def test_missing_checkpoints(workdir, tmp_path):
  best, managed = tmp_path / 'best', tmp_path / 'checkpoints'
  for kind in runs.CHECKPOINTS:
    with pytest.raises(FileNotFoundError, match='No checkpoint in workdir') as e:
      runs.find_checkpoint(str(tmp_path), kind)
    assert str(best) in str(e.value) and str(managed) in str(e.value)
  os.symlink(os.path.join(workdir, 'checkpoints'), managed)  # steps but no best weights yet
  with pytest.raises(FileNotFoundError, match='--checkpoint=latest'):
    runs.find_checkpoint(str(tmp_path), 'best')
  with pytest.raises(ValueError, match="Unknown --checkpoint value 'bestest'"):
    runs.find_checkpoint(workdir, 'bestest')
  with pytest.raises(FileNotFoundError, match='holds no orbax checkpoint'):
    runs.find_checkpoint(workdir, os.path.join(workdir, 'tokenizer'))
  path = runs.find_checkpoint(workdir, os.path.join(workdir, 'best'))
  assert path.kind == 'path' and path.step == 15


def test_unknown_split(workdir):
  with pytest.raises(ValueError, match=r"no split 'val'; it has \['test', 'train', 'validation'\]"):
    perplexity.evaluate(tiny(1), workdir, splits=['val'], progress=False)


def _flat(d, prefix=''):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def test_generated_captions_cover_each_image_once(workdir):
  config = tiny(1)
  r = runs.restore(config, workdir)
  split = perplexity.open_splits(config, workdir)['validation']
  decoding = captioning.Decoding.from_config(config, max_new_tokens=5)
  out = captioning.generate_split(r, split, decoding, progress=False)
  # 8 images in batches of 5: the padded rows of the last batch are dropped.
  assert [c.image_id for c in out] == split.image_ids.tolist()
  assert [c.index for c in out] == list(range(8))
  eos = tokenizer_lib.special_ids(r.exp.tokenizer).eos
  for c in out:
    assert len(c.tokens) <= 5 and eos not in c.tokens
    assert c.text == r.exp.tokenizer.decode(c.tokens, skip_special_tokens=True).strip()
  assert captioning.max_new_tokens(r, captioning.Decoding()) == 80 - 1 - 16 + 1  # budget + EOS
  assert captioning.text_context(config) == 0  # 'modality': text is context 0
  rules = config.copy_and_resolve_references()
  rules.data.context_map = 'kind=text&task=caption:3;kind=text&task=qa:2;*:0'
  rules.data.tasks = ('caption', 'qa')
  assert captioning.text_context(rules) == 3  # caption text under rules that see the task


@pytest.mark.parametrize('flags, match', [
    (dict(num_beams=0), 'num_beams must be an int >= 1'),
    (dict(max_new_tokens=-1), 'max_new_tokens must be an int >= 0'),
    (dict(num_beams=2.0), 'num_beams must be an int >= 1'),
])
def test_bad_decoding_settings(flags, match):
  with pytest.raises(ValueError, match=match):
    captioning.Decoding.from_config(tiny(1), **flags)


def test_cli_writes_metrics_captions_and_heatmaps(workdir):
  base = dict(_flat(demo.get_config(TINY_ARG).to_dict()))
  overrides = [f'--config.{k}={v}' for k, v in _flat(tiny(1).to_dict())
               if k != 'variants' and base[k] != v]
  res = subprocess.run([sys.executable, 'evaluate.py', f'--config=configs/demo.py:{TINY_ARG}',
                        *overrides, f'--workdir={workdir}', '--max_new_tokens=4',
                        '--heatmaps=1', '--show=2'],
                       cwd=ROOT, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-3000:]
  folder = os.path.join(workdir, 'eval')
  with open(os.path.join(folder, 'metrics.json')) as f:
    out = json.load(f)
  assert list(out['splits']) == ['validation']  # the config's eval_split
  np.testing.assert_allclose(out['splits']['validation']['perplexity'],
                             math.exp(_best_json(workdir)['val_loss']), rtol=1e-5)
  assert out['decoding'] == {'num_beams': 1, 'max_new_tokens': 4, 'length_penalty': 1.0}
  for name, images in (('validation', 8),):
    split = perplexity.open_splits(tiny(1), workdir, [name])[name]
    with open(os.path.join(folder, f'{name}_captions.json')) as f:
      results = json.load(f)  # COCO results format
    assert [r['image_id'] for r in results] == split.image_ids.tolist()
    assert all(set(r) == {'image_id', 'caption'} and isinstance(r['caption'], str)
               for r in results)
    with open(os.path.join(folder, f'{name}_metrics.json')) as f:
      m = json.load(f)
    assert m == {**out['splits'][name], 'checkpoint': out['checkpoint'],
                 'decoding': out['decoding'], 'split': name}
    assert m['images'] == images and all(0 <= m[k] for k in ('Bleu_1', 'METEOR', 'CIDEr'))
    with PIL.Image.open(os.path.join(folder, 'heatmaps', f'{name}_{results[0]["image_id"]}_'
                                     'layer1.png')) as png:
      assert png.format == 'PNG'
    assert f"image {results[0]['image_id']}: {results[0]['caption']!r}" in res.stdout
  assert 'validation (best)' in res.stderr and 'validation captions' in res.stderr  # progress


def _fake_workdir(path, contexts, splits):
  os.makedirs(os.path.join(path, 'eval'))
  config = demo.get_config(f'contexts={contexts},rank=8')
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  with open(os.path.join(path, 'eval', 'metrics.json'), 'w') as f:
    json.dump({'splits': splits}, f)
  return str(path)


def test_compare_table(tmp_path):
  full = {'perplexity': 3.14159, 'Bleu_4': 0.2, 'METEOR': 0.25, 'ROUGE_L': 0.5, 'CIDEr': 1.2346}
  a = _fake_workdir(tmp_path / 'a', 'agnostic', {'validation': {'perplexity': 4.5}})
  b = _fake_workdir(tmp_path / 'b', 'modality', {'validation': full, 'test': full})
  output = tmp_path / 'table.md'
  res = subprocess.run([sys.executable, 'evaluate.py', f'--compare={a},{b}',
                        f'--compare_output={output}'], cwd=ROOT, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = output.read_text().splitlines()
  assert lines[0] == 'Split: validation' and output.read_text() in res.stdout
  assert lines[2] == '| workdir | contexts | method | PPL | BLEU-4 | METEOR | ROUGE-L | CIDEr |'
  assert lines[4] == f'| {a} | agnostic (1) | lora r=8 | 4.500 | - | - | - | - |'
  assert lines[5] == f'| {b} | modality (2) | lora r=8 | 3.142 | 0.200 | 0.250 | 0.500 | 1.235 |'
  with pytest.raises(ValueError, match=r"has no evaluated split 'test'; .* has \['validation'\]"):
    compare.table([b, a], 'test')
  with pytest.raises(FileNotFoundError, match='run evaluate.py --workdir=.*/c first'):
    compare.table([a, str(tmp_path / 'c')])
