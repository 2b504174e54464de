"""Tasks in the data: mixed caption/QA batches, rules-based context ids from the pipeline, and
per-task perplexity that recombines to the overall one."""

import functools
import math

import jax
import numpy as np
import pytest

from configs import demo as demo_config
from cpeft_jax import contexts
from cpeft_jax.contexts import Kind
from cpeft_jax.data import pipeline, sources
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.data.demo import builder
from cpeft_jax import experiment as experiment_lib
from cpeft_jax import runs
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.evaluation import perplexity

TASKS = ('caption', 'qa')
RULES = 'kind=image:1;task=qa:2;kind=image&task=qa:3;*:0'
N, L = 16, 48  # image tokens (64 px, patches of 16), sequence length


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Tiny demo splits (6 train, 3 validation images) and a vocabulary of both tasks."""
  d = str(tmp_path_factory.mktemp('tasks'))
  cfg = builder.make_config(image_size=64, num_train=6, num_validation=3, num_test=1, seed=4)
  train = sources.load('demo', 'train', d + '/tfds', cfg)
  val = sources.load('demo', 'validation', d + '/tfds', cfg)
  tok = tokenizer_lib.word_level(train.corpus(TASKS))
  return d, train, val, tok


def _batches(split, tok, **kw):
  args = dict(batch_size=4, num_image_tokens=N, seq_len=L, context_map=RULES, image_size=64,
              train=True, seed=1, tasks=TASKS)
  return pipeline.CaptionBatches(split, tok, **(args | kw))


def test_mixed_batches_carry_tasks_prompts_and_rule_contexts(data):
  """Every (image, text, task) of an epoch appears once, laid out from the test's own reading
  of the split's texts; context ids equal rule_contexts on factors built here."""
  _, train, _, tok = data
  ids = tokenizer_lib.special_ids(tok)
  enc = lambda text: tok(text, add_special_tokens=False)['input_ids'] if text else []
  batches = _batches(train, tok)
  expected = {(int(train.image_ids[i]), p, t, task) for task in TASKS
              for i, pairs in enumerate(train.texts(task)) for p, t in pairs}
  assert len(batches) == len(expected) // 4
  seen = set()
  for batch in batches.epoch(0):
    kind_BL = np.full((4, L), Kind.PAD)
    for b in range(4):
      task = TASKS[batch['tasks'][b]]
      i = list(train.image_ids).index(batch['image_ids'][b])
      pairs = train.texts(task)[i]
      # The row's (prompt, target) is the one pair of the image laid out here: prompt
      # tokens then target tokens after the image, the loss on the target and the EOS only.
      target = batch['targets'][b][batch['loss_mask'][b] > 0].tolist()
      assert target[-1] == ids.eos
      matches = [(p, t) for p, t in pairs if enc(t) == target[:-1] and
                 batch['tokens'][b][1 + N:1 + N + len(enc(p) + enc(t))].tolist() == enc(p) + enc(t)]
      assert len(matches) == 1, (task, tok.decode(batch['tokens'][b]))
      prompt, text = matches[0]
      assert (prompt == '') == (task == 'caption')
      p, t = enc(prompt), enc(text)
      np.testing.assert_array_equal(batch['tokens'][b][:1 + N], [ids.bos] + [ids.pad] * N)
      kind_BL[b, 0], kind_BL[b, 1:1 + N] = Kind.BOS, Kind.IMAGE
      kind_BL[b, 1 + N:1 + N + len(p)] = Kind.PROMPT
      kind_BL[b, 1 + N + len(p):1 + N + len(p) + len(t)] = Kind.TEXT
      kind_BL[b, 1 + N + len(p) + len(t)] = Kind.EOS
      seen.add((int(batch['image_ids'][b]), prompt, text, task))
    task_BL = np.repeat(np.asarray(batch['tasks'])[:, None], L, 1)
    assert batch['tasks'].dtype == np.int32
    np.testing.assert_array_equal(batch['kinds'], kind_BL)
    np.testing.assert_array_equal(
        batch['context_ids'],
        contexts.rule_contexts(contexts.parse_context_map(RULES), {'kind': kind_BL,
                                                                   'task': task_BL},
                               {'task': TASKS}))
  assert len(seen) == len(batches) * 4 and seen <= expected
  assert {task for *_, task in seen} == set(TASKS)


def test_evaluation_gives_each_image_once_per_task(data):
  _, _, val, tok = data
  batches = _batches(val, tok, train=False)
  rows = [(int(i), int(t)) for b in batches.epoch(0)
          for i, t, ok in zip(b['image_ids'], b['tasks'], b['valid']) if ok]
  assert sorted(rows) == sorted((int(i), t) for t in range(2) for i in val.image_ids)
  last = list(batches.epoch(0))[-1]
  assert (last['loss_mask'][~last['valid']] == 0).all()


def test_invocations_move_the_rest_of_a_row_to_their_context(data):
  """data.invocations: from the first 'answer :' of a row on, its tokens are in context 4;
  the tokens before keep the rules' ids (checked by a plain scan of each row)."""
  _, train, _, tok = data
  plain, invoked = _batches(train, tok), _batches(train, tok, invocations={'answer :': 4})
  seq = tok('answer :', add_special_tokens=False)['input_ids']
  switched = 0
  for a, b in zip(plain.epoch(0), invoked.epoch(0)):
    for row in range(4):
      tokens, want = list(a['tokens'][row]), a['context_ids'][row].copy()
      starts = [p for p in range(L - len(seq) + 1) if tokens[p:p + len(seq)] == seq
                and a['attention_mask'][row, p:p + len(seq)].all()]
      if starts:
        want[starts[0]:] = np.where(a['attention_mask'][row, starts[0]:], 4,
                                    want[starts[0]:])
        switched += 1
      np.testing.assert_array_equal(b['context_ids'][row], want)
  assert switched > 0  # every QA row asks for an answer
  with pytest.raises(ValueError, match='gives context 4 two texts'):
    _batches(train, tok, invocations={'answer :': 4, 'question :': 4})
  with pytest.raises(ValueError, match='has no text'):
    _batches(train, tok, invocations={' ': 4})


def test_task_errors_at_the_boundary(data, tmp_path):
  _, train, _, tok = data
  with pytest.raises(ValueError, match=r"has no task 'vqa'; it has \['caption', 'qa'\]"):
    _batches(train, tok, tasks=('caption', 'vqa'), context_map='modality')
  with pytest.raises(ValueError, match=r'data.tasks must be distinct task names'):
    _batches(train, tok, tasks=('qa', 'qa'))
  with pytest.raises(ValueError, match=r"task 'qa' is not one of \['caption'\]"):
    _batches(train, tok, tasks=('caption',))  # RULES name a task the data does not have
  with pytest.raises(ValueError, match=r"Task 'qa' has a prompt of \d+ tokens .* expected "
                                       r'seq_len >= \d+'):
    _batches(train, tok, tasks=('qa',), seq_len=N + 6)


@pytest.fixture(scope='module')
def experiment(data):
  """A tiny random model with random adaptor tables (so that contexts differ)."""
  d, train, _, tok = data
  c = demo_config.get_config('contexts=modality,rank=4,pretrain_epochs=0,num_train=6')
  c.data.update(data_dir=d + '/tfds', seq_len=L, tasks=TASKS, context_map=RULES)
  c.data.demo.update(num_validation=3, num_test=1, seed=4)
  c.vision.patch_size = 16
  c.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
  c.peft.num_contexts = contexts.num_contexts(RULES)
  c.eval.batch_size = 4
  tok.save_pretrained(d + '/tokenizer')  # build() reloads a workdir's tokenizer
  exp = experiment_lib.build(c, d, train)
  trainable, frozen = trainable_lib.split(exp.variables, 'peft')
  rng = np.random.default_rng(0)
  trainable = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), trainable)
  return exp, trainable, frozen, c


class _Only:
  """Evaluation batches with the loss of every row outside `task` masked out."""

  def __init__(self, data, task):
    self.data, self.task = data, task

  def epoch(self, epoch):
    for batch in self.data.epoch(epoch):
      batch['loss_mask'] = batch['loss_mask'] * (batch['tasks'] == self.task)[:, None]
      yield batch


def test_per_task_perplexity_recombines_to_overall(data, experiment):
  """Each task's loss equals training's validation loss (perplexity.mean_loss over eval_step) on
  that task's rows alone; the overall loss equals it on all rows and is the token-weighted
  mean of the tasks'."""
  _, _, val, tok = data
  exp, trainable, frozen, _ = experiment
  mixed = _batches(val, tok, train=False, seq_len=L)
  out = perplexity.task_perplexity(exp, trainable, frozen, mixed, TASKS)
  eval_fn = functools.partial(perplexity.jitted_eval_step(exp.model), trainable, frozen)
  put = functools.partial(experiment_lib.device_batch, exp)
  reference = lambda d: perplexity.mean_loss(d, eval_fn, put)[0]
  tokens = {t: 0 for t in TASKS}
  for batch in mixed.epoch(0):
    for t in range(len(TASKS)):
      tokens[TASKS[t]] += int(batch['loss_mask'][batch['tasks'] == t].sum())
  for t, task in enumerate(TASKS):
    got = out['tasks'][task]
    np.testing.assert_allclose(got['loss'], reference(_Only(mixed, t)), rtol=1e-5)
    assert got['tokens'] == tokens[task] > 0
    np.testing.assert_allclose(got['perplexity'], math.exp(got['loss']), rtol=1e-12)
  np.testing.assert_allclose(out['loss'], reference(mixed), rtol=1e-5)
  weighted = sum(out['tasks'][t]['loss'] * out['tasks'][t]['tokens'] for t in TASKS) / sum(
      out['tasks'][t]['tokens'] for t in TASKS)
  np.testing.assert_allclose(out['perplexity'], math.exp(weighted), rtol=1e-6)
  assert abs(out['tasks']['caption']['loss'] - out['tasks']['qa']['loss']) > 1e-3
  # evaluate.py's path: a restored multi-task run reports the same per task.
  r = runs.Restored(exp, runs.Checkpoint('path', '-', None), trainable, frozen)
  split_out = perplexity.split_perplexity(r, val, progress=False)
  assert split_out['images'] == len(val)
  for task in TASKS:
    np.testing.assert_allclose(split_out['tasks'][task]['loss'], out['tasks'][task]['loss'],
                               rtol=1e-6)


def test_evaluate_writes_per_task_perplexity(data, experiment, capsys):
  """evaluate.py's work on a saved multi-task run: metrics.json holds each split's per-task
  perplexity, equal to task_perplexity of the same weights, and print_tasks prints them."""
  import json
  import os
  import evaluate
  import orbax.checkpoint as ocp
  from cpeft_jax.evaluation import captioning
  d, _, val, tok = data
  exp, trainable, frozen, c = experiment
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(d, 'best'), trainable)
  result = captioning.evaluate_workdir(c, d, captions=False)
  with open(os.path.join(d, 'eval', 'metrics.json')) as f:
    written = json.load(f)['splits']['validation']
  want = perplexity.task_perplexity(exp, trainable, frozen, _batches(val, tok, train=False),
                                    TASKS)
  for task in TASKS:
    np.testing.assert_allclose(written['tasks'][task]['loss'], want['tasks'][task]['loss'],
                               rtol=1e-6)
    assert written['tasks'][task]['tokens'] == want['tasks'][task]['tokens']
  evaluate.print_tasks(result)
  assert f"validation: task qa: loss {want['tasks']['qa']['loss']:.4f}" in capsys.readouterr().out
