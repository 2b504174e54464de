"""Nothing lost, nothing silent: damaged checkpoints and plug-ins are errors that name them, the
trainer resumes from the newest intact step, and leftovers of cut-off saves are removed.

Damage is made as a disk would make it: 8 flipped bytes in an orbax data file, a file gone,
plug-in tables scaled x1000, a field of plugin.json dropped.
"""

import glob
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from cpeft_jax import integrity, plugins, runs
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.train import checkpointing, trainer
from cpeft_jax.train import state as state_lib
from helpers import fresh_tables, random_tables, tiny


def _flip(path, n=8):
  """Inverts `n` bytes in the middle of file `path`."""
  data = bytearray(open(path, 'rb').read())
  mid = len(data) // 2
  data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
  open(path, 'wb').write(data)


def _data_file(step_dir):
  """The largest file of an orbax checkpoint's OCDBT store (array chunks)."""
  files = glob.glob(os.path.join(step_dir, '**', 'd', '*'), recursive=True)
  assert files, f'no data files under {step_dir}'
  return max(files, key=os.path.getsize)


# ----------------------------------------------------------------------------- a trained run


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """One epoch of the tiny demo without stage 0: steps 14 and 15 saved, best at 15."""
  d = tmp_path_factory.mktemp('integrity')
  c = tiny(1)
  c.pretrain.epochs = 0
  c.train.export = False
  c.data.data_dir = str(d / 'tfds')
  trainer.train_and_evaluate(c, str(d / 'w'))
  return c, d / 'w'


def _copy(run, tmp_path):
  w = tmp_path / 'w'
  shutil.copytree(run[1], w, symlinks=True)
  return w


def test_flipped_bytes_in_a_saved_step_or_best_are_detected(run, tmp_path):
  w = _copy(run, tmp_path)
  managed = str(w / 'checkpoints')
  _flip(_data_file(os.path.join(managed, '15')))
  latest = runs.Checkpoint('latest', managed, 15)
  with pytest.raises(integrity.Damaged, match=f'Step 15 of {managed} is'):
    runs.read_trainable(latest)  # the whole state, whichever leaves the file holds
  intact = runs.read_trainable(runs.Checkpoint('latest', managed, 14))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), intact)

  best = runs.find_checkpoint(str(w), 'best')
  runs.read_trainable(best)  # intact
  _flip(_data_file(str(w / 'best_versions' / '15')))
  version = w / 'best_versions' / '15'  # the one best.json names
  assert best.path == str(version)
  with pytest.raises(integrity.Damaged, match=f'{version} is'):
    runs.read_trainable(best)
  with pytest.raises(integrity.Damaged, match=f'{version} is'):
    runs.restore_trainable(best, abstract)


def test_damaged_latest_falls_back_to_the_step_before_and_leftovers_go(run, tmp_path, caplog,
                                                                       monkeypatch):
  """The rerun of the run resumes from step 14 (training itself is left out: fit stubbed)."""
  config, _ = run
  w = _copy(run, tmp_path)
  _flip(_data_file(str(w / 'checkpoints' / '15')))
  leftovers = [w / 'checkpoints' / '16.orbax-checkpoint-tmp-1',
               w / 'best_versions' / '15.orbax-checkpoint-tmp-2', w / 'best.json.tmp',
               w / 'best.tmp-link']
  for p in leftovers[:2]:
    p.mkdir()
  leftovers[2].write_text('{')
  os.symlink('best_versions/15', leftovers[3])
  monkeypatch.setattr(trainer.Trainer, 'fit', lambda self: None)
  with caplog.at_level(logging.INFO):
    out = trainer.train_and_evaluate(config, str(w))
  assert f'Checkpoint 15 ({w / "checkpoints" / "15"}) is ' in caplog.text
  assert 'Trying the checkpoint before it' in caplog.text
  assert 'resumed from step 14' in caplog.text and 'Removed 4 leftover(s)' in caplog.text
  assert out['steps'] == 14
  assert not any(os.path.lexists(p) for p in leftovers)
  assert sorted(os.listdir(w / 'checkpoints')) == ['14', 'damaged-15']


# ----------------------------------------------------------------------------- checkpoints alone


def _state(width=30):
  params = {'a': {'lora_a': jnp.arange(20.0 * width).reshape(20, width)}, 'b': jnp.ones(4)}
  return state_lib.TrainState.create(params, optax.adamw(1e-3))


def _saved(directory, steps=(1, 2)):
  state = _state()
  with checkpointing.manager(str(directory)) as mgr:
    for s in steps:
      checkpointing.save(mgr, state.replace(step=jnp.int32(s)), {'batch': s})
  return state


@pytest.mark.parametrize('damage', ['flip', 'no-data', 'no-checksums', 'no-meta'])
def test_damaged_steps_fall_back_and_all_damaged_is_an_error(tmp_path, damage):
  state = _saved(tmp_path)
  for step in ('2', '1'):
    d = tmp_path / step
    if damage == 'flip':
      _flip(_data_file(str(d / 'state')))
    elif damage == 'no-data':
      os.remove(_data_file(str(d / 'state')))
    elif damage == 'no-checksums':
      os.remove(d / integrity.STEP_METADATA)
    else:
      shutil.rmtree(d / 'meta')
    with checkpointing.manager(str(tmp_path)) as mgr:
      if step == '2':
        with pytest.raises(integrity.Damaged, match=f'Checkpoint 2 \\({d}\\)'):
          checkpointing.restore(mgr, state)
        restored, meta = checkpointing.restore_newest(mgr, state)
        assert int(restored.step) == 1 and meta == {'batch': 1}
        assert mgr.all_steps() == [1]
        assert (tmp_path / 'damaged-2').is_dir()
        checkpointing.save(mgr, state.replace(step=jnp.int32(2)), {'batch': 2})  # afresh
        assert int(checkpointing.restore(mgr, state)[0].step) == 2
        shutil.rmtree(tmp_path / '2')
      else:
        with pytest.raises(integrity.Damaged, match=f'No checkpoint in {tmp_path} reads back'):
          checkpointing.restore_newest(mgr, state)


def test_a_checkpoint_that_does_not_fit_the_config_stays_a_config_error(tmp_path):
  _saved(tmp_path)
  with checkpointing.manager(str(tmp_path)) as mgr:
    with pytest.raises(ValueError, match=r"does not fit this config's model .*trainable/a/"
                       r'lora_a is \(20, 30\) in the checkpoint, \(20, 31\)') as e:
      checkpointing.restore_newest(mgr, _state(width=31))
  assert not isinstance(e.value, integrity.Damaged)
  assert sorted(os.listdir(tmp_path)) == ['1', '2']  # nothing moved aside


def test_clean_stale_removes_only_leftovers(tmp_path):
  (tmp_path / 'checkpoints' / '3').mkdir(parents=True)
  (tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-17').mkdir()
  (tmp_path / 'best_versions' / '3').mkdir(parents=True)
  (tmp_path / 'best_versions' / '5.orbax-checkpoint-tmp-18').mkdir()
  os.symlink('best_versions/3', tmp_path / 'best')
  os.symlink('best_versions/5', tmp_path / 'best.tmp-link')  # dangling
  (tmp_path / 'best.json.tmp').write_text('{')
  removed = checkpointing.clean_stale(str(tmp_path))
  assert len(removed) == 4
  assert os.listdir(tmp_path / 'checkpoints') == ['3']
  assert os.listdir(tmp_path / 'best_versions') == ['3']
  assert sorted(os.listdir(tmp_path)) == ['best', 'best_versions', 'checkpoints']
  assert checkpointing.clean_stale(str(tmp_path)) == []


def test_digests_name_the_changed_leaf():
  tree = {'a': np.arange(6, dtype=np.float32), 'b': {'c': np.ones((2, 2), np.int32)}}
  recorded = integrity.digests(tree)
  integrity.verify(recorded, tree, 'tree')
  changed = {'a': tree['a'], 'b': {'c': tree['b']['c'] * 2}}
  with pytest.raises(integrity.Damaged, match=r'tree is damaged: .*changed bytes in b/c\)'):
    integrity.verify(recorded, changed, 'tree')
  as_int64 = {'a': tree['a'], 'b': {'c': tree['b']['c'].astype(np.int64)}}
  with pytest.raises(integrity.Damaged, match='b/c'):  # same values, other dtype
    integrity.verify(recorded, as_int64, 'tree')


# ----------------------------------------------------------------------------- plug-ins

PEFT = PeftConfig(methods=('lora',), targets='A', num_contexts=2, lora=LoraConfig(rank=2))


@pytest.fixture(scope='module')
def saved_plugin(llama_base, tmp_path_factory):
  tables = random_tables(fresh_tables(llama_base.cfg, PEFT), seed=1)
  bases = {'decoder': plugins.fingerprint(llama_base.params, llama_base.cfg)}
  plugin = plugins.extract(tables, PEFT, 1, bases, name='p', meta={'workdir': '/runs/a',
                                                                    'context': 1})
  d = tmp_path_factory.mktemp('plugin') / 'p'
  plugins.save(d, plugin)
  return plugin, d, bases


def _plugin_copy(saved_plugin, tmp_path):
  d = tmp_path / 'p'
  shutil.copytree(saved_plugin[1], d)
  return d, json.loads((d / 'plugin.json').read_text())


def test_plugin_round_trip(saved_plugin):
  plugin, d, bases = saved_plugin
  loaded = plugins.load(d, bases)
  assert (loaded.peft, loaded.name, loaded.bases) == (plugin.peft, plugin.name, bases)
  jax.tree.map(np.testing.assert_array_equal, loaded.tables, plugin.tables)
  assert len(json.loads((d / 'plugin.json').read_text())[plugins.TABLES_HASH]) == 64


@pytest.mark.parametrize('change', ['x1000', 'one-byte'])
def test_changed_plugin_tables_are_an_error(saved_plugin, tmp_path, change):
  d, _ = _plugin_copy(saved_plugin, tmp_path)
  path = d / 'tables.safetensors'
  if change == 'x1000':
    tables = safetensors.numpy.load_file(str(path))
    safetensors.numpy.save_file({k: v * 1000 for k, v in tables.items()}, str(path))
  else:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(data)
  with pytest.raises(integrity.Damaged, match=f'Plug-in {d} is damaged: the sha256'):
    plugins.load(d, saved_plugin[2])


def _drop(path):
  def edit(config):
    *parents, last = path
    for k in parents:
      config = config[k]
    del config[last]
  return edit


def _set(key, value):
  return lambda config: config.__setitem__(key, value)


@pytest.mark.parametrize('edit, message', [
    (_set('bases', {}), r'"bases" is \{\}; expected the fingerprint of at least one base'),
    (_drop(['bases', 'decoder', 'config']), r"base 'decoder' lacks field\(s\) \['config'\]"),
    (_drop(['bases', 'decoder', 'tensors']), r"base 'decoder' lacks field\(s\) \['tensors'\]"),
    (lambda c: c['bases']['decoder']['tensors'].clear(), '"tensors" is {}'),
    (lambda c: c['bases']['decoder']['tensors']['norm/weight'].pop('stats'),
     r"tensor 'norm/weight' lacks field\(s\) \['stats'\]"),
    (lambda c: c['bases']['decoder']['tensors']['norm/weight']['stats'].pop(),
     r"tensor 'norm/weight' has stats .* expected 10 numbers"),
    (_set('bases', {'decoder': 'x'}), "base 'decoder' is str; expected an object"),
], ids=['empty-bases', 'no-config', 'no-tensors', 'empty-tensors', 'no-stats', 'short-stats',
        'not-an-object'])
def test_incomplete_fingerprints_are_an_error(saved_plugin, tmp_path, edit, message):
  d, config = _plugin_copy(saved_plugin, tmp_path)
  edit(config)
  (d / 'plugin.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=f'Plug-in {d} \\(plugin.json\\): .*{message}'):
    plugins.load(d)


@pytest.mark.parametrize('text, message', [
    ('{"format": "cpeft-plugin/1", ', 'is not valid JSON'),
    ('[1, 2]', 'holds list; expected a JSON object'),
    (None, r"lacks field\(s\) \['peft'\]"),
    ('name', 'wrong types: name is int, expected str'),
    ('old', r"has no 'tables_sha256'.*python -m cpeft_jax.plugins --workdir=/runs/a --context=1 "
     r'--checkpoint=best --out='),
], ids=['invalid-json', 'not-an-object', 'missing-key', 'wrong-type', 'without-hash'])
def test_bad_plugin_json_is_an_error_naming_the_file(saved_plugin, tmp_path, text, message):
  d, config = _plugin_copy(saved_plugin, tmp_path)
  if text is None:
    del config['peft']
  elif text == 'name':
    config['name'] = 3
  elif text == 'old':
    del config[plugins.TABLES_HASH]
  path = d / 'plugin.json'
  path.write_text(text if text not in (None, 'name', 'old') else json.dumps(config))
  with pytest.raises(ValueError, match=f'{path}.*{message}'):
    plugins.load(d)
