"""Orbax checkpoints of the train state and the data position, saved atomically and verified.

A checkpoint holds the trainable tree, the optimizer state and the step (the frozen base is
rebuilt from its source, never saved), plus JSON metadata: the data position (epoch, batch),
the best validation loss so far and the config. Orbax writes to a temporary directory and
renames it when complete, so an interrupted save never leaves a half-written checkpoint; the
best-validation weights kept beside them are swapped in the same way (`save_best`).

Every save records the sha256 of each leaf (`integrity.digests`) in orbax's custom metadata,
written inside the same atomic save; `restore` compares what it reads with them, because orbax
itself would restore flipped bytes without a word. `restore_newest` falls back past damaged
checkpoints, and `clean_stale` removes what a save cut off by a kill leaves behind.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from cpeft_jax import integrity, trees
from cpeft_jax import workdir as workdir_lib
from cpeft_jax.train.state import TrainState

TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's name for a save in progress
DAMAGED = 'damaged-'  # a damaged step moved aside: DIR/checkpoints/damaged-<step>
BEST = workdir_lib.BEST  # the best-validation trainable tree; DIR/best.json its info
TMP_LINK, TMP_JSON = '.tmp-link', '.json.tmp'  # DIR/best's swap in progress


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})  # metadata readable before a save


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
  tree = _tree(state)
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                         meta=ocp.args.JsonSave(meta)),
           custom_metadata={integrity.METADATA_KEY: integrity.digests(tree)}, force=True)
  mgr.wait_until_finished()


def step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mgr.directory), str(step))


def restore(mgr: ocp.CheckpointManager, state: TrainState, step: int | None = None):
  """(state, meta) from checkpoint `step` (default: latest); `state` gives shapes/shardings.

  Raises ValueError when the saved tree does not fit `state` (the config's model) and
  `integrity.Damaged` when the checkpoint cannot be read back as it was saved (unreadable,
  missing files, bytes that differ from its checksums). A checkpoint saved before checksums
  were recorded is read with a warning.
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {mgr.directory}.')
  where = f'Checkpoint {step} ({step_dir(mgr, step)})'
  wanted = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(state))
  metadata = integrity.read(lambda: mgr.metadata(step), where)
  saved = integrity.read(lambda: metadata.item_metadata['state'], where)
  if saved is None:
    raise integrity.Damaged(f'{where} is unreadable: orbax finds no metadata of its state.')
  saved = getattr(saved, 'tree', saved)
  trees.require_same_shapes(wanted, trees.shapes(saved), f'Checkpoint {step} in {mgr.directory}',
                            got_name='the checkpoint', want_name="this config's model",
                            hint='different methods, ranks, contexts or targets?')
  out = integrity.read(lambda: mgr.restore(step, args=ocp.args.Composite(  # its shapes fit
      state=ocp.args.StandardRestore(integrity.as_saved(wanted, saved)),
      meta=ocp.args.JsonRestore())), where)
  integrity.check_saved(step_dir(mgr, step), metadata.custom_metadata, out['state'], where)
  tree = integrity.cast_like(out['state'], wanted)
  return state.replace(step=tree['step'], trainable=tree['trainable'],
                       opt_state=tree['opt_state']), dict(out['meta'])


def restore_newest(mgr: ocp.CheckpointManager, state: TrainState):
  """(state, meta) of the newest checkpoint that reads back as saved; None when there is none.

  Each damaged newer one is named in a warning and, once an older one restores, moved aside to
  DIR/damaged-<step> so that training writes that step afresh. A checkpoint that does not fit
  the config stays the config's error (ValueError), never a fallback; when every checkpoint is
  damaged, `integrity.Damaged` names the directory. On several processes each reads for itself:
  their leaves sharded across processes are not verified (see `integrity`).
  """
  damaged, why = [], []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      out = restore(mgr, state, step)
    except integrity.Damaged as e:
      logging.warning('%s Trying the checkpoint before it.', e)
      damaged.append(step)
      why.append(str(e))
      continue
    if damaged:
      _set_aside(mgr, damaged)
      logging.warning('Resuming from step %d of %s: damaged step(s) %s moved aside to %s.',
                      step, mgr.directory, damaged,
                      ', '.join(DAMAGED + str(s) for s in damaged))
    return out
  if damaged:
    raise integrity.Damaged(
        f'No checkpoint in {mgr.directory} reads back as it was saved (steps {damaged}); move '
        f'the directory aside to train from the start. {" ".join(why)}')
  return None


def _set_aside(mgr: ocp.CheckpointManager, steps) -> None:
  if jax.process_index() == 0:
    for step in steps:
      target = os.path.join(str(mgr.directory), f'{DAMAGED}{step}')
      shutil.rmtree(target, ignore_errors=True)  # an older one of the same step
      os.replace(step_dir(mgr, step), target)
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes('cpeft_set_aside_damaged')
  mgr.reload()


def clean_stale(workdir: str) -> list[str]:
  """Removes what saves cut off by a kill leave behind, and logs it: orbax's temporary
  directories (*.orbax-checkpoint-tmp*) in DIR/checkpoints and DIR/best_versions, and the best
  link's DIR/best.tmp-link and DIR/best.json.tmp. Process 0 only; call it before any save."""
  if jax.process_index():
    return []
  workdir = os.path.abspath(workdir)
  found = [p for d in (workdir_lib.CHECKPOINTS, workdir_lib.BEST_VERSIONS)
           for p in glob.glob(os.path.join(glob.escape(workdir), d, f'*{TMP_SUFFIX}*'))]
  best = os.path.join(workdir, BEST)
  found += [p for p in (best + TMP_LINK, best + TMP_JSON) if os.path.lexists(p)]
  for p in found:
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    else:
      os.remove(p)
  if found:
    logging.info('Removed %d leftover(s) of saves cut off before they completed: %s',
                 len(found), ', '.join(sorted(found)))
  return sorted(found)


def save_best(workdir: str, trainable, info: dict[str, Any]) -> str:
  """Saves the best-validation weights so that an interruption keeps the previous ones.

  Each save is an orbax directory `best_versions/<step>` (written under a temporary name and
  renamed by orbax when complete), named by the step alone so that every host of a multi-host
  run writes the same one; `best` is a symlink swapped onto it with an atomic rename, then
  older versions are deleted. `best.json` is replaced atomically after the swap. Each version
  carries its leaves' sha256 in its orbax metadata, which `runs` checks on reading. A rerun that
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
      ckpt.save(target, trainable, force=True,  # force: replaces an unlinked leftover
                custom_metadata={integrity.METADATA_KEY: integrity.digests(trainable)})
  if jax.process_index():
    return link
  if os.path.isdir(link) and not os.path.islink(link):  # a real directory from an older run
    os.replace(link, os.path.join(versions, 'legacy'))
  tmp_link = link + TMP_LINK
  if os.path.lexists(tmp_link):
    os.remove(tmp_link)
  os.symlink(os.path.join(workdir_lib.BEST_VERSIONS, name), tmp_link)
  os.replace(tmp_link, link)
  tmp_json = link + TMP_JSON
  with open(tmp_json, 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(tmp_json, os.path.join(workdir, BEST + '.json'))
  for old in os.listdir(versions):
    if old != name:
      shutil.rmtree(os.path.join(versions, old), ignore_errors=True)
  return link
