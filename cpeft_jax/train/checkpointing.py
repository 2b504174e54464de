"""Orbax checkpoints of the train state and the data position, saved atomically and verified.

A checkpoint holds the trainable tree, the optimizer state and the step (the frozen base is
rebuilt from its source, never saved), plus JSON metadata: the data position (epoch, batch),
the best validation loss so far and the config. Orbax writes to a temporary directory and
renames it when complete (on an object store it marks a complete save instead), so an
interrupted save never leaves a half-written checkpoint; the best-validation weights kept
beside them are committed in the same spirit (`save_best`).

Saves of the state are asynchronous: `save` returns once orbax has copied the arrays to the
host (so the step may donate them), the write and commit run in the background, and the next
save waits for the previous one. Whoever saves calls `wait` before exiting (normal end, signal
stop, exception), or the last save is lost.

Every save records the sha256 of each leaf (`integrity.digests`) in orbax's custom metadata,
written inside the same atomic save; `restore` compares what it reads with them, because orbax
itself would restore flipped bytes without a word. `restore_newest` falls back past damaged
checkpoints, and `clean_stale` removes what a save cut off by a kill leaves behind.

Paths are `etils.epath` paths (`workdir.path`): a local directory or, where its filesystem is
installed, gs://...; nothing here needs a symlink or an atomic rename of the object store.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from cpeft_jax import integrity, trees
from cpeft_jax import workdir as workdir_lib
from cpeft_jax.train.state import TrainState

TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's name for a save in progress
DAMAGED = 'damaged-'  # a damaged step moved aside: DIR/checkpoints/damaged-<step>
BEST = workdir_lib.BEST  # the local convenience link to the best version
TMP_LINK = '.tmp-link'  # DIR/best.tmp-link: the link's swap in progress
TMP_JSON = '.json' + workdir_lib.TMP  # DIR/best.json.tmp: best.json being written (locally)


def manager(directory: epath.PathLike, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """The CheckpointManager of DIR/checkpoints: asynchronous saves, at most `max_to_keep` steps."""
  return ocp.CheckpointManager(
      workdir_lib.path(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})  # metadata readable before a save


def _tree(state: TrainState) -> dict:
  return {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state}


def save(mgr: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
  """Starts saving `state` with `meta` at its step and returns before the write completes.

  The previous save is waited for first. A step already saved with the same meta is left
  alone; with other meta (the same state before and after its epoch's validation) it is
  rewritten, so each step has one checkpoint, the latest word on it. The arrays are copied to
  the host before this returns, so `state` may be donated at once.
  """
  mgr.wait_until_finished()  # the previous save: committed before its step is looked at
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


def wait(mgr: ocp.CheckpointManager) -> None:
  """Blocks until the save in progress (if any) is committed; raises what the write raised."""
  mgr.wait_until_finished()


def step_dir(mgr: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(mgr.directory) / str(step)


def restore(mgr: ocp.CheckpointManager, state: TrainState, step: int | None = None):
  """(state, meta) from checkpoint `step` (default: latest); `state` gives shapes/shardings.

  Raises ValueError when the saved tree does not fit `state` (the config's model) and
  `integrity.Damaged` when the checkpoint cannot be read back as it was saved (unreadable,
  missing files, bytes that differ from its checksums). A checkpoint saved before checksums
  were recorded is read with a warning.
  """
  mgr.wait_until_finished()
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
      target = epath.Path(mgr.directory) / f'{DAMAGED}{step}'
      if target.exists():
        target.rmtree()  # an older one of the same step
      step_dir(mgr, step).rename(target)
  _sync('cpeft_set_aside_damaged')
  mgr.reload()


def _sync(name: str) -> None:
  """A barrier of every process (none on one)."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name)


def _remove(p: epath.Path) -> None:
  """Removes file, link or directory `p` (a link itself, never what it points to)."""
  if workdir_lib.is_local(p) and os.path.islink(p):
    os.remove(p)
  elif p.is_dir():
    p.rmtree()
  else:
    p.unlink(missing_ok=True)


def _lexists(p: epath.Path) -> bool:
  return os.path.lexists(p) if workdir_lib.is_local(p) else p.exists()


def clean_stale(workdir: epath.PathLike) -> list[str]:
  """Removes what saves cut off by a kill leave behind, and logs it: orbax's temporary
  directories (*.orbax-checkpoint-tmp*) in DIR/checkpoints and DIR/best_versions, the best
  link's DIR/best.tmp-link and DIR/best.json.tmp. Process 0 removes; every process calls it,
  before any save, and waits for it (so no host writes into what is being removed)."""
  found = []
  if jax.process_index() == 0:
    w = workdir_lib.path(workdir)
    found = [p for d in (workdir_lib.CHECKPOINTS, workdir_lib.BEST_VERSIONS) if (w / d).is_dir()
             for p in (w / d).glob(f'*{TMP_SUFFIX}*')]
    found += [p for p in (w / (BEST + TMP_LINK), w / (BEST + TMP_JSON)) if _lexists(p)]
    for p in found:
      _remove(p)
    if found:
      logging.info('Removed %d leftover(s) of saves cut off before they completed: %s',
                   len(found), ', '.join(sorted(map(str, found))))
  _sync('cpeft_clean_stale')
  return sorted(map(str, found))


def _committed(w: epath.Path, target: epath.Path) -> bool:
  """Whether `target` is the best version already committed (named by best.json or, in an
  older run, linked by DIR/best) and present."""
  current = workdir_lib.best_version(w)
  if current is None or not target.is_dir():
    return False
  return current == target or (workdir_lib.is_local(w) and os.path.islink(current) and
                               os.path.realpath(current) == os.path.realpath(target))


def save_best(workdir: epath.PathLike, trainable, info: dict[str, Any]) -> epath.Path:
  """Saves the best-validation weights so that an interruption keeps the previous ones.

  Each save is an orbax directory `best_versions/<step>` (committed by orbax when complete),
  named by the step alone so that every host of a multi-host run writes the same one. Then
  process 0 writes `best.json` (`info` and `version`, the name of that directory) in one
  atomic write: that is the commit, and readers (`workdir.best_version`) go through it. Only
  after it, the local convenience link DIR/best is swapped onto the version (none on an object
  store) and older versions are deleted. Each version carries its leaves' sha256 in its orbax
  metadata, which `runs` checks on reading. A rerun that replays to a step whose version is
  already committed (a stop between this save and the state's) keeps that version: exact
  resumption makes it the same weights. Returns the version's directory.
  """
  w = workdir_lib.path(workdir)
  name = str(int(info['step']))
  version = f'{workdir_lib.BEST_VERSIONS}/{name}'
  target = w / version
  if not _committed(w, target):
    with ocp.StandardCheckpointer() as ckpt:  # every process joins an orbax save
      ckpt.save(target, trainable, force=True,  # force: replaces an uncommitted leftover
                custom_metadata={integrity.METADATA_KEY: integrity.digests(trainable)})
  if jax.process_index():
    return target
  workdir_lib.write_text(w / workdir_lib.BEST_JSON,
                         json.dumps({**info, workdir_lib.VERSION: version}, indent=2))
  _link(w, version)
  for old in (w / workdir_lib.BEST_VERSIONS).iterdir():
    if old.name != name:
      _remove(old)
  return target


def _link(w: epath.Path, version: str) -> None:
  """Points the local convenience link DIR/best at `version`, atomically (a new link renamed
  onto it). On an object store, or where symlinks fail, it removes what an older run left at
  DIR/best instead, so that no stale pointer remains beside best.json."""
  best = w / BEST
  if not workdir_lib.is_local(w):
    if best.exists():
      best.rmtree()  # a real directory an older run wrote
    return
  if os.path.isdir(best) and not os.path.islink(best):
    best.rmtree()  # a real directory from an older run
  tmp = w / (BEST + TMP_LINK)
  if os.path.lexists(tmp):
    os.remove(tmp)
  try:
    os.symlink(version, tmp)
  except (OSError, NotImplementedError) as e:
    logging.info('No link %s to %s (%s); best.json names it.', best, version, e)
    if os.path.lexists(best):
      os.remove(best)
    return
  os.replace(tmp, best)
