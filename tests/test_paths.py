"""Workdir paths through etils.epath, on a disk and as on an object store (no symlinks, no atomic
renames), and asynchronous saves of the train state that commit in the background.

A real gs:// bucket is out of reach here, so the object-store branches run on local paths with
`workdir.is_local` answering False and os.symlink / os.replace refusing to work: what passes
that way needs neither. (Orbax's own commits of a local path still rename, as they must.)
"""

import json
import os
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from cpeft_jax import runs
from cpeft_jax import workdir as workdir_lib
from cpeft_jax.train import adaptor_export, checkpointing, metrics, trainer
from cpeft_jax.train import state as state_lib

ONE = {'adaptors': {'a': np.arange(6, dtype=np.float32).reshape(2, 3)}}
TWO = {'adaptors': {'a': np.full((2, 3), 2.0, np.float32)}}


def _refuse(*args, **kwargs):
  raise OSError(f'not on this filesystem: {args}')


@pytest.fixture(params=['no-symlinks', 'object-store'])
def mode(request, monkeypatch):
  """Symlinks fail (a local disk without them), or every object-store branch is taken."""
  monkeypatch.setattr(os, 'symlink', _refuse)
  if request.param == 'object-store':
    monkeypatch.setattr(workdir_lib, 'is_local', lambda p: False)
    monkeypatch.setattr(os, 'replace', _refuse)
  return request.param


def _read_best(w):
  ckpt = runs.find_checkpoint(w, 'best')
  return ckpt, runs.read_trainable(ckpt)


def _equal(got, want):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)


def test_best_swap_and_readers_need_no_symlink(tmp_path, mode):
  w = str(tmp_path)
  checkpointing.save_best(w, ONE, {'step': 3, 'val_loss': 2.0})
  (tmp_path / 'best_versions' / '5').mkdir()  # a save cut off before its commit
  checkpointing.save_best(w, TWO, {'step': 5, 'val_loss': 1.0})
  assert not os.path.lexists(tmp_path / 'best')  # no pointer but best.json
  assert json.loads((tmp_path / 'best.json').read_text()) == {
      'step': 5, 'val_loss': 1.0, 'version': 'best_versions/5'}
  ckpt, tree = _read_best(w)
  assert (ckpt.kind, ckpt.path, ckpt.step) == ('best', str(tmp_path / 'best_versions' / '5'), 5)
  _equal(tree, TWO)
  checkpointing.save_best(w, ONE, {'step': 5, 'val_loss': 1.0})  # replayed: committed, kept
  _equal(_read_best(w)[1], TWO)
  assert os.listdir(tmp_path / 'best_versions') == ['5']
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), TWO)
  _equal(runs.restore_trainable(ckpt, abstract), TWO)


def test_a_save_cut_off_before_best_json_keeps_the_previous_best(tmp_path, mode, monkeypatch):
  """The new version is written, then the process dies before best.json: readers still get
  the previous weights; the rerun's replay of that save commits it."""
  w = str(tmp_path)
  checkpointing.save_best(w, ONE, {'step': 3, 'val_loss': 2.0})
  monkeypatch.setattr(workdir_lib, 'write_text', lambda *a: _refuse(*a))
  with pytest.raises(OSError, match='not on this filesystem'):
    checkpointing.save_best(w, TWO, {'step': 5, 'val_loss': 1.0})
  assert sorted(os.listdir(tmp_path / 'best_versions')) == ['3', '5']
  ckpt, tree = _read_best(w)
  assert ckpt.step == 3
  _equal(tree, ONE)
  (tmp_path / 'best.json.tmp').write_text('{')  # what a local write cut off leaves
  assert checkpointing.clean_stale(w) == [str(tmp_path / 'best.json.tmp')]
  monkeypatch.undo()
  checkpointing.save_best(w, TWO, {'step': 5, 'val_loss': 1.0})
  ckpt, tree = _read_best(w)
  assert ckpt.step == 5 and os.listdir(tmp_path / 'best_versions') == ['5']
  _equal(tree, TWO)


@pytest.mark.parametrize('layout', ['symlink', 'directory'])
def test_older_workdirs_read_through_best_and_are_taken_over(tmp_path, layout, monkeypatch):
  """Runs from before best.json named a version: DIR/best is a symlink or a real directory."""
  w = str(tmp_path)
  with ocp.StandardCheckpointer() as ckpt:
    if layout == 'symlink':
      ckpt.save(tmp_path / 'best_versions' / '3', ONE)
      os.symlink(os.path.join('best_versions', '3'), tmp_path / 'best')
    else:
      ckpt.save(tmp_path / 'best', ONE)
  (tmp_path / 'best.json').write_text(json.dumps({'step': 3, 'val_loss': 2.0}))
  ckpt, tree = _read_best(w)
  assert (ckpt.path, ckpt.step) == (str(tmp_path / 'best'), 3)
  _equal(tree, ONE)
  monkeypatch.setattr(os, 'symlink', _refuse)
  checkpointing.save_best(w, TWO, {'step': 5, 'val_loss': 1.0})
  assert sorted(os.listdir(tmp_path)) == ['best.json', 'best_versions']  # no stale pointer
  _equal(_read_best(w)[1], TWO)


def test_a_named_version_that_is_gone_is_an_error_naming_it(tmp_path):
  (tmp_path / 'best.json').write_text(json.dumps({'step': 7, 'version': 'best_versions/7'}))
  with pytest.raises(ValueError, match=f'best.json names .*{tmp_path}/best_versions/7, which '
                     'is missing'):
    runs.find_checkpoint(str(tmp_path), 'best')


def test_local_link_is_kept_as_a_convenience(tmp_path):
  checkpointing.save_best(str(tmp_path), ONE, {'step': 3, 'val_loss': 2.0})
  checkpointing.save_best(str(tmp_path), TWO, {'step': 4, 'val_loss': 1.0})
  assert os.readlink(tmp_path / 'best') == os.path.join('best_versions', '4')
  with ocp.StandardCheckpointer() as ckpt:
    _equal(ckpt.restore(tmp_path / 'best'), TWO)


def test_metrics_and_export_on_an_object_store(tmp_path, mode):
  """metrics.jsonl cannot be appended to on an object store: it is rewritten, lines from a
  run before a resume kept; the export is written in place, with what a local one holds."""
  w = str(tmp_path)
  first = metrics.Writer(w)
  first.write(1, {'loss': 2.0})
  first.close()
  again = metrics.Writer(w)  # a resumed run
  again.write(2, {'loss': 1.5})
  again.write(3, {'loss': 1.0})
  again.close()
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}, {'step': 3, 'loss': 1.0}]

  (tmp_path / 'config.json').write_text(json.dumps({'seed': 0}))
  checkpointing.save_best(w, TWO, {'step': 5, 'val_loss': 1.0})
  out = adaptor_export.export(w)
  assert out == str(tmp_path / 'export')
  info = json.loads((tmp_path / 'export' / 'export.json').read_text())
  assert info['source'] == 'best' and info['step'] == 5 and 'version' not in info
  assert info['parameters'] == 6
  assert sorted(os.listdir(tmp_path / 'export')) == ['config.json', 'export.json',
                                                      'trainable.safetensors']


# ----------------------------------------------------------------------------- async saves


def _state(seed):
  params = {'a': {'lora_a': jnp.arange(12.0).reshape(3, 4) + seed}, 'b': jnp.ones(4) * seed}
  return state_lib.TrainState.create(params, optax.adamw(1e-3)).replace(step=jnp.int32(seed))


@pytest.fixture
def gated(monkeypatch):
  """Orbax's commits (the rename of a complete save) wait until someone waits for them: a
  `wait_until_finished` while a save is in progress opens the gate. `log` records the order."""
  from orbax.checkpoint._src.path import async_path
  gate, log, real_rename = threading.Event(), [], async_path.rename

  async def rename(src, dst):
    assert gate.wait(timeout=120), 'nobody waited for the save'
    if os.path.basename(str(dst)).isdigit():  # the step's commit (its items are renamed first)
      log.append(f'commit {os.path.basename(str(dst))}')
    return await real_rename(src, dst)

  real_wait = ocp.CheckpointManager.wait_until_finished

  def wait_until_finished(mgr):
    if mgr.is_saving_in_progress():
      log.append('wait')
      gate.set()
    return real_wait(mgr)

  monkeypatch.setattr(async_path, 'rename', rename)
  monkeypatch.setattr(ocp.CheckpointManager, 'wait_until_finished', wait_until_finished)
  return log


def test_a_save_returns_before_its_write_and_the_next_waits_for_it(tmp_path, gated):
  one, two = _state(1), _state(2)
  want_one = jax.device_get((one.trainable, one.opt_state))
  with checkpointing.manager(tmp_path) as mgr:
    checkpointing.save(mgr, one, {'batch': 1})
    assert mgr.is_saving_in_progress() and not (tmp_path / '1').exists() and gated == []
    for x in jax.tree.leaves(one):  # as the donating train step does: orbax holds a host copy
      x.delete()
    checkpointing.save(mgr, two, {'batch': 2})  # waits for step 1's commit first
    assert gated[:2] == ['wait', 'commit 1'] and mgr.is_saving_in_progress()
    checkpointing.wait(mgr)
    assert gated == ['wait', 'commit 1', 'wait', 'commit 2']
    assert not mgr.is_saving_in_progress() and mgr.all_steps() == [1, 2]
    restored, meta = checkpointing.restore(mgr, _state(0), 1)
  assert meta == {'batch': 1} and int(restored.step) == 1
  _equal((restored.trainable, restored.opt_state), want_one)


@pytest.mark.parametrize('stop', [SystemExit('Stopped by signal 15'), FloatingPointError('nan')])
def test_fit_waits_for_the_last_save_however_it_ends(tmp_path, gated, stop):
  """Trainer.fit's exit (a signal's SystemExit, an error) commits the save in progress."""
  mgr = checkpointing.manager(tmp_path)

  def train_epoch(epoch):
    checkpointing.save(mgr, _state(4), {'batch': 4})
    raise stop

  stub = types.SimpleNamespace(
      progress=types.SimpleNamespace(epoch=0), config=types.SimpleNamespace(
          train=types.SimpleNamespace(epochs=1)), train_epoch=train_epoch, mgr=mgr,
      writer=types.SimpleNamespace(close=lambda: None), _stop=lambda *a: None)
  with pytest.raises(type(stop)):
    trainer.Trainer.fit(stub)
  assert gated == ['wait', 'commit 4'] and mgr.all_steps() == [4]
  mgr.close()
  with checkpointing.manager(tmp_path) as reader:
    assert reader.all_steps() == [4]
    assert int(checkpointing.restore(reader, _state(0))[0].step) == 4
