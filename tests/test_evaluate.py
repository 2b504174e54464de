"""evaluate.py: perplexity of a trained workdir equals training's validation; clear errors."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo  # noqa: E402
from cpeft_jax.evaluation import perplexity  # noqa: E402
from cpeft_jax.train import checkpointing, loop  # noqa: E402
from cpeft_jax.train import state as state_lib  # noqa: E402
from test_train_loop import tiny  # noqa: E402

TINY_ARG = 'epochs=1,num_train=24,rank=4,pretrain_epochs=2'  # tiny()'s argument to demo


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """One trained epoch (15 steps; checkpoints at steps 14 and 15, best at 15)."""
  path = str(tmp_path_factory.mktemp('evaluate') / 'run')
  loop.train_and_evaluate(tiny(1), path)
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
  assert out['checkpoint'] == {'kind': 'best', 'path': os.path.join(workdir, 'best'),
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
  mine = perplexity.restore_trainable(perplexity.Checkpoint('latest', managed, 14),
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
  with pytest.raises(perplexity.CheckpointMismatch, match='does not fit') as e:
    perplexity.evaluate(config, workdir, config_name='configs/x.py', progress=False)
  msg = str(e.value)
  assert os.path.join(workdir, 'best') in msg and 'configs/x.py' in msg and named in msg
  assert 'k_proj/lora_a' in msg


def test_missing_checkpoints(workdir, tmp_path):
  best, managed = tmp_path / 'best', tmp_path / 'checkpoints'
  for kind in perplexity.CHECKPOINTS:
    with pytest.raises(FileNotFoundError, match='No checkpoint in workdir') as e:
      perplexity.find_checkpoint(str(tmp_path), kind)
    assert str(best) in str(e.value) and str(managed) in str(e.value)
  os.symlink(os.path.join(workdir, 'checkpoints'), managed)  # steps but no best weights yet
  with pytest.raises(FileNotFoundError, match='--checkpoint=latest'):
    perplexity.find_checkpoint(str(tmp_path), 'best')
  with pytest.raises(ValueError, match="Unknown --checkpoint value 'bestest'"):
    perplexity.find_checkpoint(workdir, 'bestest')
  with pytest.raises(FileNotFoundError, match='holds no orbax checkpoint'):
    perplexity.find_checkpoint(workdir, os.path.join(workdir, 'tokenizer'))
  path = perplexity.find_checkpoint(workdir, os.path.join(workdir, 'best'))
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


def test_cli_writes_metrics(workdir):
  base = dict(_flat(demo.get_config(TINY_ARG).to_dict()))
  overrides = [f'--config.{k}={v}' for k, v in _flat(tiny(1).to_dict()) if base[k] != v]
  res = subprocess.run([sys.executable, 'evaluate.py', f'--config=configs/demo.py:{TINY_ARG}',
                        *overrides, f'--workdir={workdir}', '--splits=validation,test'],
                       cwd=ROOT, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    out = json.load(f)
  assert sorted(out['splits']) == ['test', 'validation']
  np.testing.assert_allclose(out['splits']['validation']['perplexity'],
                             math.exp(_best_json(workdir)['val_loss']), rtol=1e-5)
  assert 'validation (best)' in res.stderr  # the progress bar
