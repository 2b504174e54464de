"""Caption perplexity of a trained workdir's weights on whole splits, as training validates.

`mean_loss` is training's validation: the token-weighted mean of an evaluation step's loss
sums over one pass of a split's batches (the step and the batch placement are given, as
big_vision's evaluators are given a predict function). `evaluate` restores a workdir's
weights (`runs.restore`: 'best', 'latest' or a directory saved like DIR/best) and computes it
with `losses.eval_step`, so 'best' on the validation split gives back the perplexity in
best.json. A multi-task run (data.tasks with several tasks) also gets each task's loss,
perplexity and target-token count (`task_perplexity`); the overall loss is their
token-weighted mean.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from cpeft_jax import experiment, losses, runs
from cpeft_jax import workdir as workdir_lib
from cpeft_jax.models import vlm


def mean_loss(data, eval_fn: Callable[[dict], dict], put: Callable[[dict], dict]):
  """(mean target-token loss, perplexity) over one pass of `data`'s batches; `put` places a
  host batch for `eval_fn`, which returns its {'loss_sum', 'tokens'}."""
  total, count = 0.0, 0.0
  for batch in data.epoch(0):
    out = jax.device_get(eval_fn(put(batch)))
    total += float(out['loss_sum'])
    count += float(out['tokens'])
  loss = total / max(count, 1.0)
  return loss, losses.perplexity(loss)


def open_splits(config: ml_collections.ConfigDict, workdir: str,
                splits: list[str] | None = None) -> dict:
  """{name: Split} of `splits` (default: data.eval_split); an unknown name lists the split
  names that exist. Open them once the config is known to fit: a demo config that differs
  would build its own dataset in the workdir."""
  return {name: experiment.open_split(config, workdir, name)
          for name in dict.fromkeys(splits or [config.data.eval_split])}


def split_perplexity(r: runs.Restored, split, *, name: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
  """{loss, perplexity, images} of one split (named `name` in the progress bar), by training's
  validation computation."""
  data = r.exp.batches(split, train=False)
  batches = ProgressBatches(data, f'{name or split.name} ({r.ckpt.kind})', progress)
  if len(data.tasks) > 1:
    return task_perplexity(r.exp, r.trainable, r.frozen, batches, data.tasks) | {
        'images': len(split)}
  eval_fn = functools.partial(jitted_eval_step(r.exp.model), r.trainable, r.frozen)
  loss, ppl = mean_loss(batches, eval_fn, functools.partial(experiment.device_batch, r.exp))
  return {'loss': loss, 'perplexity': ppl, 'images': len(split)}


def task_perplexity(exp: experiment.Experiment, trainable, frozen, data, tasks) -> dict[str, Any]:
  """{loss, perplexity, tokens, tasks: {task: {loss, perplexity, tokens}}} over one pass of
  evaluation batches whose `tasks` index into `tasks`; losses are per target token, and the
  overall loss is the token-weighted mean of the tasks' (the same sums, grouped by task)."""
  eval_fn = jitted_task_eval_step(exp.model, len(tasks))
  loss_T, tokens_T = np.zeros(len(tasks)), np.zeros(len(tasks))
  for batch in data.epoch(0):
    out = jax.device_get(eval_fn(trainable, frozen, experiment.device_batch(exp, batch)))
    loss_T += np.asarray(out['loss_sum'], np.float64)
    tokens_T += np.asarray(out['tokens'], np.float64)
  per_task = {task: _ppl(s, n) for task, s, n in zip(tasks, loss_T, tokens_T)}
  return _ppl(loss_T.sum(), tokens_T.sum()) | {'tasks': per_task}


def _ppl(loss_sum: float, tokens: float) -> dict[str, float]:
  loss = float(loss_sum) / max(float(tokens), 1.0)
  return {'loss': loss, 'perplexity': losses.perplexity(loss), 'tokens': int(tokens)}


@functools.lru_cache(maxsize=4)
def jitted_task_eval_step(model, num_tasks: int):
  return jax.jit(functools.partial(losses.task_eval_step, apply_fn=vlm.apply_fn(model),
                                   num_tasks=num_tasks))


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'best',
             splits: list[str] | None = None, config_name: str = 'the given config',
             progress: bool = True) -> dict[str, Any]:
  """{'checkpoint': {kind, path, step}, 'splits': {name: {loss, perplexity, images}}}.

  `splits` defaults to the config's data.eval_split; `config_name` names the config in errors.
  """
  r = runs.restore(config, workdir, checkpoint=checkpoint, config_name=config_name)
  data = open_splits(config, workdir, splits)
  return {'checkpoint': dataclasses.asdict(r.ckpt),
          'splits': {name: split_perplexity(r, split, name=name, progress=progress)
                     for name, split in data.items()}}


@functools.lru_cache(maxsize=4)
def jitted_eval_step(model):
  return jax.jit(functools.partial(losses.eval_step, apply_fn=vlm.apply_fn(model)))


def write_metrics(workdir: str, result: dict[str, Any]) -> str:
  """Writes `result` to DIR/eval/metrics.json (process 0 only); returns the path."""
  path = os.path.join(workdir, workdir_lib.EVAL, 'metrics.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
  return path


@dataclasses.dataclass
class ProgressBatches:
  """Batches whose epochs draw a progress bar on stderr (`mean_loss` only iterates epochs)."""
  data: Any
  desc: str
  enabled: bool

  def epoch(self, epoch: int, start: int = 0):
    return tqdm.tqdm(self.data.epoch(epoch, start=start), total=len(self.data) - start,
                     desc=self.desc, unit='batch', file=sys.stderr, disable=not self.enabled)
