"""Caption perplexity of a trained workdir's weights on whole splits, as training validates.

The frozen base is rebuilt as training built it (`loop.build` with the workdir, which reloads
the saved tokenizer and the demo's stage-0 decoder) and the trainable tree is restored from
the workdir: 'best' (the best-validation weights in DIR/best), 'latest' (the newest step of
DIR/checkpoints, its trainable tree only) or the path of a directory saved like DIR/best.
The loss is `loop.evaluate_loss` over `step.eval_step`, the computation of training's
validation, so 'best' on the validation split gives back the perplexity in best.json.
A multi-task run (data.tasks with several tasks) also gets each task's loss, perplexity and
target-token count (`task_perplexity`); the overall loss is their token-weighted mean.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from cpeft_jax import checkpoints
from cpeft_jax.models import vlm
from cpeft_jax.train import loop
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib

CHECKPOINTS = ('best', 'latest')
# Config entries that decide the trainable tree's shapes, compared with the run's config.json
# to say which setting disagrees when a checkpoint does not fit.
MODEL_KEYS = ('peft', 'model', 'connector', 'vision', 'text_model', 'tokenizer', 'train.mode')


class CheckpointMismatch(ValueError):
  """The checkpoint's trainable tree does not fit the model the config describes."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  kind: str  # 'best', 'latest' or 'path'
  path: str  # for 'latest' the CheckpointManager's directory, else the saved tree's
  step: int | None  # training step of the weights, where known


def find_checkpoint(workdir: str, checkpoint: str = 'best') -> Checkpoint:
  """The weights that --checkpoint names; errors name the paths looked in."""
  best = os.path.abspath(os.path.join(workdir, 'best'))
  managed = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if checkpoint not in CHECKPOINTS:
    if not os.path.isdir(checkpoint):
      raise ValueError(f'Unknown --checkpoint value {checkpoint!r}: expected one of '
                       f'{CHECKPOINTS} or a directory saved like {best} (no such directory).')
    path = os.path.abspath(checkpoint)
    _saved_tree(path)  # fail before the model is built
    return Checkpoint('path', path, _read_json(path + '.json').get('step'))
  latest = _latest_step(managed)
  if checkpoint == 'best' and os.path.isdir(best):
    return Checkpoint('best', best, _read_json(best + '.json').get('step'))
  if checkpoint == 'latest' and latest is not None:
    return Checkpoint('latest', managed, latest)
  if latest is None and not os.path.isdir(best):
    raise FileNotFoundError(f'No checkpoint in workdir {workdir}: looked for best-validation '
                            f'weights in {best} and for steps in {managed}; train first.')
  if checkpoint == 'best':
    raise FileNotFoundError(f'No best-validation weights in workdir {workdir}: {best} does not '
                            f'exist (training writes it after its first validation); {managed} '
                            f'holds step {latest}: pass --checkpoint=latest.')
  raise FileNotFoundError(f'No step in {managed}; workdir {workdir} has best-validation weights '
                          f'in {best}: pass --checkpoint=best.')


@dataclasses.dataclass
class Restored:
  """A workdir's model rebuilt as training built it, with the checkpoint's trainable tree."""
  exp: loop.Experiment
  ckpt: Checkpoint
  trainable: Any
  frozen: Any

  @property
  def variables(self):
    return state_lib.merge(self.trainable, self.frozen)


def restore(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'best',
            config_name: str = 'the given config') -> Restored:
  """Rebuilds the model and restores the weights --checkpoint names; `config_name` names the
  config in errors."""
  ckpt = find_checkpoint(workdir, checkpoint)
  _check_base_saved(config, workdir)
  # The tokenizer and the base decoder are read from the workdir, so build needs no train split.
  exp = loop.build(config, workdir, None)
  trainable, frozen = state_lib.split(exp.variables, config.train.mode)
  replicated = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          trainable)
  trainable = restore_trainable(ckpt, abstract, config_name=config_name,
                                note=_config_note(config, workdir, config_name))
  return Restored(exp, ckpt, trainable, jax.device_put(frozen, replicated))


def open_splits(config: ml_collections.ConfigDict, workdir: str,
                splits: list[str] | None = None) -> dict:
  """{name: Split} of `splits` (default: data.eval_split); an unknown name lists the split
  names that exist. Open them once the config is known to fit: a demo config that differs
  would build its own dataset in the workdir."""
  return {name: loop.open_split(config, workdir, name)
          for name in dict.fromkeys(splits or [config.data.eval_split])}


def split_perplexity(r: Restored, split, *, name: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
  """{loss, perplexity, images} of one split (named `name` in the progress bar), by training's
  validation computation."""
  data = r.exp.batches(split, train=False)
  batches = _Progress(data, f'{name or split.name} ({r.ckpt.kind})', progress)
  if len(data.tasks) > 1:
    return task_perplexity(r.exp, r.trainable, r.frozen, batches, data.tasks) | {
        'images': len(split)}
  loss, ppl = loop.evaluate_loss(r.exp, r.trainable, r.frozen, batches, _eval_fn(r.exp.model))
  return {'loss': loss, 'perplexity': ppl, 'images': len(split)}


def task_perplexity(exp: loop.Experiment, trainable, frozen, data, tasks) -> dict[str, Any]:
  """{loss, perplexity, tokens, tasks: {task: {loss, perplexity, tokens}}} over one pass of
  evaluation batches whose `tasks` index into `tasks`; losses are per target token, and the
  overall loss is the token-weighted mean of the tasks' (the same sums, grouped by task)."""
  eval_fn = _task_eval_fn(exp.model, len(tasks))
  loss_T, tokens_T = np.zeros(len(tasks)), np.zeros(len(tasks))
  for batch in data.epoch(0):
    device = loop._device_batch(exp, batch)  # noqa: SLF001 - training's own batch placement
    out = jax.device_get(eval_fn(trainable, frozen, device))
    loss_T += np.asarray(out['loss_sum'], np.float64)
    tokens_T += np.asarray(out['tokens'], np.float64)
  per_task = {task: _ppl(s, n) for task, s, n in zip(tasks, loss_T, tokens_T)}
  return _ppl(loss_T.sum(), tokens_T.sum()) | {'tasks': per_task}


def _ppl(loss_sum: float, tokens: float) -> dict[str, float]:
  loss = float(loss_sum) / max(float(tokens), 1.0)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)), 'tokens': int(tokens)}


def _task_sums(trainable, frozen, batch, *, apply_fn, num_tasks: int):
  """Masked loss sum and token count of each task [T] (rows grouped by batch['tasks'])."""
  loss_BL, mask_BL = step_lib.masked_losses(apply_fn, state_lib.merge(trainable, frozen), batch,
                                            train=False, rng=None)
  loss_T, tokens_T = step_lib.task_sums(loss_BL, mask_BL, batch['tasks'], num_tasks)
  return {'loss_sum': loss_T, 'tokens': tokens_T}


@functools.lru_cache(maxsize=4)
def _task_eval_fn(model, num_tasks: int):
  return jax.jit(functools.partial(_task_sums, apply_fn=vlm.apply_fn(model), num_tasks=num_tasks))


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'best',
             splits: list[str] | None = None, config_name: str = 'the given config',
             progress: bool = True) -> dict[str, Any]:
  """{'checkpoint': {kind, path, step}, 'splits': {name: {loss, perplexity, images}}}.

  `splits` defaults to the config's data.eval_split; `config_name` names the config in errors.
  """
  r = restore(config, workdir, checkpoint=checkpoint, config_name=config_name)
  data = open_splits(config, workdir, splits)
  return {'checkpoint': dataclasses.asdict(r.ckpt),
          'splits': {name: split_perplexity(r, split, name=name, progress=progress)
                     for name, split in data.items()}}


@functools.lru_cache(maxsize=4)
def _eval_fn(model):
  return jax.jit(functools.partial(step_lib.eval_step, apply_fn=vlm.apply_fn(model)))


def write_metrics(workdir: str, result: dict[str, Any]) -> str:
  """Writes `result` to DIR/eval/metrics.json (process 0 only); returns the path."""
  path = os.path.join(workdir, 'eval', 'metrics.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
  return path


def restore_trainable(ckpt: Checkpoint, abstract, *, config_name: str = 'the given config',
                      note: str = ''):
  """The checkpoint's trainable tree, placed as `abstract`; it must match in shapes first."""
  if ckpt.kind == 'latest':
    with _manager(ckpt.path) as mgr:
      saved = mgr.item_metadata(ckpt.step)['state']['trainable']
      _check_fits(_shapes(saved), _shapes(abstract), f'step {ckpt.step} of {ckpt.path}',
                  config_name, note)
      # Only the trainable tree: evaluation needs neither the optimizer state nor its config.
      item = {'trainable': abstract}
      out = mgr.restore(ckpt.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)))
    return out['state']['trainable']
  _check_fits(_shapes(_saved_tree(ckpt.path)), _shapes(abstract), ckpt.path, config_name, note)
  with ocp.StandardCheckpointer() as reader:
    return reader.restore(ckpt.path, abstract)


@dataclasses.dataclass
class _Progress:
  """Batches whose epochs draw a progress bar on stderr (evaluate_loss only iterates epochs)."""
  data: Any
  desc: str
  enabled: bool

  def epoch(self, epoch: int, start: int = 0):
    return tqdm.tqdm(self.data.epoch(epoch, start=start), total=len(self.data) - start,
                     desc=self.desc, unit='batch', file=sys.stderr, disable=not self.enabled)


def _manager(directory: str) -> ocp.CheckpointManager:
  # Handlers by item so that metadata can be read and 'state' restored in part.
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


def _saved_tree(path: str):
  """The metadata tree of a directory saved like DIR/best (StandardCheckpointer)."""
  with ocp.StandardCheckpointer() as reader:
    try:
      metadata = reader.metadata(path).item_metadata
    except (FileNotFoundError, ValueError) as e:
      metadata, why = None, f': {e}'
    else:
      why = ''
  if metadata is None:
    raise FileNotFoundError(f'{path} holds no orbax checkpoint of a trainable tree (a directory '
                            f'saved like DIR/best){why}.')
  return metadata.tree


def _latest_step(directory: str) -> int | None:
  if not os.path.isdir(directory):
    return None
  with _manager(directory) as mgr:
    return mgr.latest_step()


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _check_base_saved(config, workdir):
  """Evaluation reloads, never rebuilds, what training saved: its tokenizer and stage-0 decoder."""
  if config.text_model:
    return
  needed = []
  if config.tokenizer == 'word_level':
    needed.append(os.path.join(workdir, 'tokenizer'))
  if config.get('pretrain', {}).get('epochs'):
    needed.append(os.path.join(workdir, 'base_lm', checkpoints.CONFIG))
  missing = [p for p in needed if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'Workdir {workdir} lacks {missing}, which training saves and '
                            'evaluation reloads (the tokenizer built from the training '
                            "captions, the demo's pre-trained base decoder).")


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(x.shape)
          for path, x in leaves}


def _some(items: list[str], n: int = 3) -> str:
  more = f' (and {len(items) - n} more)' if len(items) > n else ''
  return ', '.join(items[:n]) + more


def _check_fits(saved: dict, wanted: dict, where: str, config_name: str, note: str):
  problems = []
  if only := sorted(saved.keys() - wanted.keys()):
    problems.append(f'only in the checkpoint: {_some(only)}')
  if only := sorted(wanted.keys() - saved.keys()):
    problems.append(f"only in the config's model: {_some(only)}")
  shapes = [f'{k} is {saved[k]} in the checkpoint, {wanted[k]} in the config\'s model'
            for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  if shapes:
    problems.append(f'different shapes: {_some(shapes)}')
  if problems:
    raise CheckpointMismatch(f'The checkpoint {where} does not fit the model of {config_name} '
                             f'(different methods, ranks, contexts or targets?): '
                             f'{"; ".join(problems)}.{note}')


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _config_note(config, workdir, config_name) -> str:
  """The model-shaping entries where the workdir's config.json and `config` disagree."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return ''
  saved = _flat(_read_json(path))
  given = _flat(json.loads(config.to_json_best_effort()))
  keys = sorted(k for k in saved.keys() | given.keys()
                if any(k == m or k.startswith(m + '.') for m in MODEL_KEYS))
  diffs = [f'{k}={saved.get(k, "(absent)")!r} vs {given.get(k, "(absent)")!r}' for k in keys
           if saved.get(k) != given.get(k)]
  return (f' The config training ran with ({path}) vs {config_name}: {"; ".join(diffs)}.'
          if diffs else '')
