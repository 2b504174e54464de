"""Orbax checkpoints of the train state and the data position, saved atomically.

A checkpoint holds the trainable tree, the optimizer state and the step (the frozen base is
rebuilt from its source, never saved), plus JSON metadata: the data position (epoch, batch),
the best validation loss so far and the config. Orbax writes to a temporary directory and
renames it when complete, so an interrupted save never leaves a half-written checkpoint; the
best-validation weights kept beside them are swapped in the same way (`save_best`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from cpeft_jax import workdir as workdir_lib
from cpeft_jax.train.state import TrainState


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def _tree(state: TrainState) -> dict:
  return {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state}


def save(mgr: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
  """Saves `state` with `meta` at its step. A step already saved with the same meta is left
  alone; with other meta (the same state before and after its epoch's validation) it is
  rewritten, so each step has one checkpoint, the latest word on it."""
  step = int(jax.device_get(state.step))
  if step in mgr.all_steps():
    saved = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if dict(saved) == meta:
      return
    mgr.delete(step)
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_tree(state)),
                                         meta=ocp.args.JsonSave(meta)), force=True)
  mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, state: TrainState, step: int | None = None):
  """(state, meta) from checkpoint `step` (default: latest); `state` gives shapes/shardings."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {mgr.directory}.')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(state))
  try:
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError) as e:
    raise ValueError(f'Checkpoint {step} in {mgr.directory} does not match this config\'s '
                     f'model (different methods, ranks, contexts or targets?): {e}') from e
  tree = out['state']
  return state.replace(step=tree['step'], trainable=tree['trainable'],
                       opt_state=tree['opt_state']), dict(out['meta'])


BEST = workdir_lib.BEST  # the best-validation trainable tree; DIR/best.json its info


def save_best(workdir: str, trainable, info: dict[str, Any]) -> str:
  """Saves the best-validation weights so that an interruption keeps the previous ones.

  Each save is an orbax directory `best_versions/<step>` (written under a temporary name and
  renamed by orbax when complete), named by the step alone so that every host of a multi-host
  run writes the same one; `best` is a symlink swapped onto it with an atomic rename, then
  older versions are deleted. `best.json` is replaced atomically after the swap. A rerun that
  replays to a step whose version is already linked (a stop between this save and the state's)
  keeps that version: exact resumption makes it the same weights.
  """
  workdir = os.path.abspath(workdir)
  versions = os.path.join(workdir, workdir_lib.BEST_VERSIONS)
  os.makedirs(versions, exist_ok=True)
  name = str(int(info['step']))
  target = os.path.join(versions, name)
  link = os.path.join(workdir, BEST)
  linked = os.path.islink(link) and os.path.realpath(link) == os.path.realpath(target)
  if not linked:
    with ocp.StandardCheckpointer() as ckpt:  # every process joins an orbax save
      ckpt.save(target, trainable, force=True)  # force: replaces an unlinked leftover
  if jax.process_index():
    return link
  if os.path.isdir(link) and not os.path.islink(link):  # a real directory from an older run
    os.replace(link, os.path.join(versions, 'legacy'))
  tmp_link = link + '.tmp-link'
  if os.path.lexists(tmp_link):
    os.remove(tmp_link)
  os.symlink(os.path.join(workdir_lib.BEST_VERSIONS, name), tmp_link)
  os.replace(tmp_link, link)
  tmp_json = os.path.join(workdir, BEST + '.json.tmp')
  with open(tmp_json, 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(tmp_json, os.path.join(workdir, BEST + '.json'))
  for old in os.listdir(versions):
    if old != name:
      shutil.rmtree(os.path.join(versions, old), ignore_errors=True)
  return link
