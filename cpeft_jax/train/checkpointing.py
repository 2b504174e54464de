"""Orbax checkpoints of the train state and the data position, saved atomically.

A checkpoint holds the trainable tree, the optimizer state and the step (the frozen base is
rebuilt from its source, never saved), plus JSON metadata: the data position (epoch, batch),
the best validation loss so far and the config. Orbax writes to a temporary directory and
renames it when complete, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cpeft_jax.train.state import TrainState


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def _tree(state: TrainState) -> dict:
  return {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state}


def save(mgr: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
  step = int(jax.device_get(state.step))
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
