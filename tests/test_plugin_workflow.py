"""The plug-in recipe of configs/demo_vqa.py through the real training loop, on a tiny demo:
a caption run and a QA run on one frozen base, a plug-in taken from each workdir, both
assembled in a third run and fine-tuned with the caption plug-in frozen.

References: each task's own run (its restored best weights) for the assembled model, the
plug-in's tables for the frozen rows; and examples/plugins_two_tasks.py end to end.
"""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo_vqa  # noqa: E402
from cpeft_jax import checkpoints, plugins  # noqa: E402
from cpeft_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from cpeft_jax.models import vlm  # noqa: E402
from cpeft_jax.models.llama import Decoder, DecoderConfig  # noqa: E402
from cpeft_jax import experiment, runs  # noqa: E402
from cpeft_jax.train import trainer  # noqa: E402
from helpers import cpu_env  # noqa: E402


def tiny(arg):
  c = demo_vqa.get_config(f'{arg},num_train=16,rank=4,epochs=1')
  c.data.demo.num_validation = 8
  c.data.seq_len = 48  # BOS + 16 image tokens + text + EOS
  c.vision.patch_size = 16
  c.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
  c.train.update(batch_size=8, log_every=5, checkpoint_every=0, export=False)
  c.eval.batch_size = 8
  c.optim.update(warmup_steps=2, learning_rate=3e-3)
  return c


@dataclasses.dataclass
class Recipe:
  root: str
  runs: dict = dataclasses.field(default_factory=dict)

  def dir(self, name):
    return os.path.join(self.root, name)

  def config(self, stage, **args):
    more = {'base': self.dir('caption')} if stage != 'caption' else {}
    if stage == 'assemble':
      more.update(caption_plugin=self.dir('p_caption'), qa_plugin=self.dir('p_qa'))
    more.update(args)
    return tiny(','.join([f'stage={stage}'] + [f'{k}={v}' for k, v in more.items()]))


def random_base(config, workdir):
  """A random decoder with the vocabulary of both tasks in workdir/base_lm, where the caption
  stage would pre-train one (it keeps one that is there): the recipe without stage 0's cost."""
  split = experiment.open_split(config, workdir, 'train')
  tok = tokenizer_lib.word_level(split.corpus(demo_vqa.TASKS))
  cfg = DecoderConfig.from_dict(dict(config.model, vocab_size=len(tok)))
  params = jax.jit(Decoder(cfg).init)(jax.random.key(0), np.zeros((1, 1), np.int32))['params']
  checkpoints.save_decoder(os.path.join(workdir, 'base_lm'), cfg, params, tok)


@pytest.fixture(scope='module')
def recipe(tmp_path_factory):
  r = Recipe(str(tmp_path_factory.mktemp('recipe')))
  random_base(r.config('caption'), r.dir('caption'))
  for task in ('caption', 'qa'):  # separate runs; qa shares the caption run's base
    out = trainer.train_and_evaluate(r.config(task), r.dir(task))
    assert np.isfinite(out['val_loss'])
  # The caption plug-in through the command line, the QA one through the library.
  res = subprocess.run(
      [sys.executable, '-m', 'cpeft_jax.plugins', f'--workdir={r.dir("caption")}', '--context=0',
       '--name=caption', f'--out={r.dir("p_caption")}'], cwd=ROOT, capture_output=True,
      text=True, env=cpu_env())
  assert res.returncode == 0, res.stderr[-2000:]
  assert "plug-in 'caption': context 0" in res.stdout
  r.runs = {'qa': runs.restore_run(r.dir('qa'))}  # the run rebuilt with its best weights
  plugins.save(r.dir('p_qa'), runs.plugin_from_run(r.runs['qa'], 0, name='qa'))
  return r


def _logits(model, variables, exp, batch, context_ids=None):
  batch = dict(batch)
  if context_ids is not None:
    batch['context_ids'] = context_ids
  return np.asarray(jax.jit(vlm.apply_fn(model, logits=True))(
      variables, experiment.device_batch(exp, batch)))


@pytest.fixture(scope='module')
def assembled(recipe):
  """The assembly run's experiment as built (before any fine-tuning), and its train split."""
  config = recipe.config('assemble')
  split = experiment.open_split(config, recipe.dir('vqa0'), 'train')
  return experiment.build(config, recipe.dir('vqa0'), split), split


def test_assembled_plugins_reproduce_each_run_on_its_tasks_examples(recipe, assembled):
  exp, split = assembled
  assert (exp.model.peft.num_contexts, exp.model.peft.rows) == (2, (0, 1))
  # One mixed batch: the rules put each example's tokens in its task's context.
  batch = next(exp.batches(split, train=True).epoch(0))
  tasks_B = batch['tasks']
  assert set(tasks_B) == {0, 1}
  np.testing.assert_array_equal(batch['context_ids'].max(1), tasks_B)
  got = _logits(exp.model, exp.variables, exp, batch)
  mask = batch['attention_mask'].astype(bool)
  want = []
  for task in ('caption', 'qa'):  # each task's own run, restored
    run = recipe.runs.get(task) or runs.restore(recipe.config(task), recipe.dir(task))
    want.append(_logits(run.exp.model, run.variables, exp, batch,
                        np.zeros_like(batch['context_ids'])))
  assert np.abs(want[0] - want[1])[mask].max() > 1e-2  # the two plug-ins differ
  for t in (0, 1):
    rows = tasks_B == t
    np.testing.assert_allclose(got[rows][mask[rows]], want[t][rows][mask[rows]], atol=1e-5)


def test_finetune_keeps_frozen_plugin_rows_bit_identical(recipe, assembled):
  config = recipe.config('assemble', freeze='caption')
  config.train.plugins = True  # and write each context's plug-in of the result
  out = trainer.train_and_evaluate(config, recipe.dir('vqa'))
  assert out['steps'] > 0 and np.isfinite(out['val_loss'])
  with ocp.StandardCheckpointer() as ckpt:
    best = ckpt.restore(os.path.join(recipe.dir('vqa'), 'best'))
  plugged = {t: plugins.load(recipe.dir(f'p_{t}')) for t in ('caption', 'qa')}
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  moved = []
  for t, p in enumerate(('caption', 'qa')):
    for (path, table), (_, row) in zip(flat(best['adaptors']), flat(plugged[p].tables)):
      axis = table.ndim + plugins.ROW_AXIS[path[-1].key]
      now = np.take(np.asarray(table), [t], axis=axis)
      if p == 'caption':
        np.testing.assert_array_equal(now, np.asarray(row), err_msg=str(path))
      else:
        moved.append(not np.array_equal(now, np.asarray(row)))
  assert any(moved)  # the QA rows did train
  written = {t: plugins.load(os.path.join(recipe.dir('vqa'), 'plugins', str(c)))
             for c, t in enumerate(('caption', 'qa'))}
  jax.tree.map(np.testing.assert_array_equal, written['caption'].tables,
               plugged['caption'].tables)
  assert written['qa'].peft == plugged['qa'].peft and written['qa'].meta['step'] == out['steps']
  # The connector is part of the plug-ins' base: still the one they were trained with.
  jax.tree.map(np.testing.assert_array_equal, best['params']['connector'],
               assembled[0].variables['params']['connector'])


def test_plugin_on_another_base_is_refused_before_training(recipe):
  base = checkpoints.load_decoder(os.path.join(recipe.dir('caption'), 'base_lm'))
  params = jax.tree.map(np.array, base.params)
  params['layers']['mlp']['down_proj']['kernel'][0] *= 1.5  # another base: one layer differs
  tok = tokenizer_lib.load(os.path.join(recipe.dir('caption'), 'base_lm'))
  checkpoints.save_decoder(recipe.dir('other_base'), base.config, params, tok)
  config = recipe.config('assemble')
  config.text_model = recipe.dir('other_base')
  with pytest.raises(ValueError, match=r'Plug-in .*p_caption .*context 0.*base \'decoder\'.*'
                     r'trained on another base.*down_proj'):
    experiment.build(config, recipe.dir('wrong'), None)


def test_two_tasks_example_runs_and_its_assembly_matches_each_plugin(tmp_path):
  res = subprocess.run(
      [sys.executable, 'examples/plugins_two_tasks.py', '--steps=3', f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True,
      env=cpu_env())
  assert res.returncode == 0, res.stderr[-2000:]
  table = dict(re.findall(r'^(base alone|caption plug-in alone|qa plug-in alone|assembled, '
                          r'mixed batch) +(\S+ +\S+)$', res.stdout, re.M))
  v = {k: [float(x) for x in s.split()] for k, s in table.items()}
  assert len(v) == 4, res.stdout
  alone = [float(x) for x in re.search(r'same halves: (\S+), (\S+)\)', res.stdout).groups()]
  np.testing.assert_allclose(v['assembled, mixed batch'], alone, atol=2e-3)
  assert v['caption plug-in alone'][0] < v['base alone'][0]
  assert v['qa plug-in alone'][1] < v['base alone'][1]


@pytest.mark.parametrize('arg,message', [
    ('stage=qa', r'stage=qa needs base=<the caption run'),
    ('stage=assemble,base=x,qa_plugin=q', r'stage=assemble needs caption_plugin=DIR'),
    ('stage=caption,freeze=caption', r"freeze='caption'; expected one task .* with stage=assemble"),
    ('stage=vqa', r"stage='vqa'; expected one of \('caption', 'qa', 'assemble'\)"),
])
def test_demo_vqa_config_errors_name_the_argument(arg, message):
  with pytest.raises(ValueError, match=message):
    demo_vqa.get_config(arg)


def test_freezing_a_context_without_adaptors_is_an_error():
  from cpeft_jax.adaptors import PeftConfig
  from cpeft_jax.train import state as state_lib
  config = tiny('stage=caption')
  config.train.freeze_contexts = (1,)
  with pytest.raises(ValueError, match=r'train.freeze_contexts=\(1,\): contexts \[1\] have no '
                     r'adaptor rows \(this model adapts contexts \(0,\)\)'):
    trainer.optimizer(config, state_lib.OptimConfig(), PeftConfig(methods=('lora',), targets='AF'))
