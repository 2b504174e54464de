"""What a training workdir holds, read back: its checkpoints found and restored, its model
rebuilt, its plug-ins taken out.

A run's weights are named as evaluate.py's --checkpoint names them: 'best' (the best-validation
trainable tree, the DIR/best_versions/<step> that DIR/best.json names), 'latest' (the newest
step of DIR/checkpoints, its trainable tree only) or the path of a directory saved like a best
version. `restore` rebuilds the model from the config as training built it (`experiment.build`
reloads the saved tokenizer and the demo's stage-0 decoder, never rebuilding them) and checks
the checkpoint fits it before reading it. Workdirs are `etils.epath` paths (gs://... where that
filesystem is installed); nothing here reads through a symlink.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp
import numpy as np

from cpeft_jax import experiment, hosts, integrity, plugins, sharding, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax import workdir as workdir_lib

CHECKPOINTS = ('best', 'latest')
# Config entries that decide the trainable tree's shapes, compared with the run's config.json
# to say which setting disagrees when a checkpoint does not fit.
SHAPING_KEYS = ('peft', 'model', 'connector', 'vision', 'text_model', 'tokenizer', 'train.mode',
                'train.full_embeddings')


class CheckpointMismatch(ValueError):
  """The checkpoint's trainable tree does not fit the model the config describes."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  kind: str  # 'best', 'latest' or 'path'
  path: str  # for 'latest' the CheckpointManager's directory, else the saved tree's
  step: int | None  # training step of the weights, where known


def find_checkpoint(workdir: epath.PathLike, checkpoint: str = 'best') -> Checkpoint:
  """The weights that --checkpoint names; errors name the paths looked in.

  'best' is the version DIR/best.json names (`workdir.best_version`; DIR/best in older runs).
  """
  w = workdir_lib.path(workdir)
  best = workdir_lib.best_version(w)
  managed = w / workdir_lib.CHECKPOINTS
  if checkpoint not in CHECKPOINTS:
    path = workdir_lib.path(checkpoint)
    if not path.is_dir():
      raise ValueError(f'Unknown --checkpoint value {checkpoint!r}: expected one of '
                       f'{CHECKPOINTS} or a directory saved like {w / workdir_lib.BEST_VERSIONS}'
                       '/<step> (no such directory).')
    saved_tree(path)  # fail before the model is built
    step = read_json(f'{path}.json').get('step')
    if step is None and path.parent.name == workdir_lib.BEST_VERSIONS and path.name.isdigit():
      step = int(path.name)
    return Checkpoint('path', str(path), step)
  latest = latest_step(managed)
  if checkpoint == 'best' and best is not None:
    if not best.is_dir():
      raise integrity.Damaged(f'{w / workdir_lib.BEST_JSON} names best-validation weights in '
                              f'{best}, which is missing; pass --checkpoint=latest.')
    return Checkpoint('best', str(best), read_json(w / workdir_lib.BEST_JSON).get('step'))
  if checkpoint == 'latest' and latest is not None:
    return Checkpoint('latest', str(managed), latest)
  json_ = w / workdir_lib.BEST_JSON
  if latest is None and best is None:
    raise FileNotFoundError(f'No checkpoint in workdir {w}: looked for best-validation weights '
                            f'through {json_} and for steps in {managed}; train first.')
  if checkpoint == 'best':
    raise FileNotFoundError(f'No best-validation weights in workdir {w}: {json_} does not name '
                            f'any (training writes it after its first validation); {managed} '
                            f'holds step {latest}: pass --checkpoint=latest.')
  raise FileNotFoundError(f'No step in {managed}; workdir {w} has best-validation weights in '
                          f'{best}: pass --checkpoint=best.')


@dataclasses.dataclass
class Restored:
  """A workdir's model rebuilt as training built it, with the checkpoint's trainable tree."""
  exp: experiment.Experiment
  ckpt: Checkpoint
  trainable: Any
  frozen: Any
  workdir: str = ''

  @property
  def variables(self):
    return trainable_lib.merge(self.trainable, self.frozen)


def restore(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'best',
            config_name: str = 'the given config') -> Restored:
  """Rebuilds the model and restores the weights --checkpoint names; `config_name` names the
  config in errors."""
  ckpt = find_checkpoint(workdir, checkpoint)
  check_base_saved(config, workdir)
  # The tokenizer and the base decoder are read from the workdir, so build needs no train split.
  exp = experiment.build(config, workdir, None)
  trainable, frozen = trainable_lib.split_for(exp.variables, config)
  abstract = _replicated(trainable, exp.mesh)
  trainable = restore_trainable(ckpt, abstract, config_name=config_name,
                                note=config_note(config, workdir, config_name))
  # The frozen base as training placed it (the partition rules; `build` loads it so); the
  # trainable tree whole on every device, small beside it and read back to hosts.
  rules = sharding.parse_rules(config.get('partition_rules'))
  frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, exp.mesh, rules))
  return Restored(exp, ckpt, trainable, frozen, str(workdir_lib.path(workdir)))


def restore_run(workdir: epath.PathLike, checkpoint: str = 'best') -> Restored:
  """A training run rebuilt from DIR/config.json with its `checkpoint` weights."""
  path = workdir_lib.path(workdir) / workdir_lib.CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'{path} is missing: {workdir} is not a training workdir.')
  config = ml_collections.ConfigDict(read_json(path))
  return restore(config, workdir, checkpoint=checkpoint, config_name=str(path))


def restore_trainable(ckpt: Checkpoint, abstract, *, config_name: str = 'the given config',
                      note: str = ''):
  """The checkpoint's trainable tree, placed as `abstract`; it must match in shapes first, and
  its bytes the checksums saved with it (`integrity.Damaged` otherwise)."""
  if ckpt.kind == 'latest':
    where = f'Step {ckpt.step} of {ckpt.path}'
    with steps_reader(ckpt.path) as mgr:
      metadata = integrity.read(lambda: mgr.metadata(ckpt.step), where)
      saved = integrity.read(lambda: metadata.item_metadata['state']['trainable'], where)
      _check_fits(saved, abstract, f'step {ckpt.step} of {ckpt.path}', config_name, note)
      # Only the trainable tree: evaluation needs neither the optimizer state nor its config.
      item = {'trainable': integrity.as_saved(abstract, saved)}
      out = integrity.read(lambda: mgr.restore(ckpt.step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True))), where)
    tree = out['state']['trainable']
    integrity.check_saved(epath.Path(ckpt.path) / str(ckpt.step), metadata.custom_metadata,
                          tree, where, 'trainable')
    return integrity.cast_like(tree, abstract)
  saved = saved_tree(ckpt.path)
  _check_fits(saved, abstract, ckpt.path, config_name, note)
  with ocp.StandardCheckpointer() as reader:
    custom = reader.metadata(ckpt.path).custom_metadata
    tree = integrity.read(
        lambda: reader.restore(ckpt.path, integrity.as_saved(abstract, saved)), ckpt.path)
  integrity.check_saved(ckpt.path, custom, tree, ckpt.path)
  return integrity.cast_like(tree, abstract)


def read_trainable(ckpt: Checkpoint):
  """The checkpoint's trainable tree as saved (host arrays), with no model to fit; checked
  against the checksums saved with it."""
  if ckpt.kind == 'latest':
    where = f'Step {ckpt.step} of {ckpt.path}'
    with steps_reader(ckpt.path) as mgr:
      custom = integrity.read(lambda: mgr.metadata(ckpt.step), where).custom_metadata
      # PyTreeRestore: steps_reader's handler (StandardRestore would not match it).
      out = integrity.read(lambda: mgr.restore(
          ckpt.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())), where)
    integrity.check_saved(epath.Path(ckpt.path) / str(ckpt.step), custom, out['state'], where)
    return out['state']['trainable']
  with ocp.StandardCheckpointer() as reader:
    metadata = integrity.read(lambda: reader.metadata(ckpt.path), ckpt.path)
    # Several hosts: every leaf whole on each (replicated), so each can read it to the host.
    target = (_replicated(metadata.item_metadata.tree) if jax.process_count() > 1
              else None)
    tree = integrity.read(lambda: reader.restore(ckpt.path, target), ckpt.path)
    custom = metadata.custom_metadata
  integrity.check_saved(ckpt.path, custom, tree, ckpt.path)
  return tree


def _replicated(tree, mesh: jax.sharding.Mesh | None = None):
  """Shapes and dtypes of `tree`'s leaves (arrays or orbax metadata), each leaf whole on every
  device of `mesh` (default: every device of every process)."""
  if mesh is None:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('devices',))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), tree)


def _check_fits(saved, wanted, where: str, config_name: str, note: str):
  trees.require_same_shapes(
      wanted, saved, f'The checkpoint {where}', got_name='the checkpoint',
      want_name=f"the config's model ({config_name})",
      hint='different methods, ranks, contexts or targets?', note=note, error=CheckpointMismatch)


def steps_reader(directory: epath.PathLike) -> ocp.CheckpointManager:
  """A reader of DIR/checkpoints whose 'state' can be restored in part."""
  return ocp.CheckpointManager(
      workdir_lib.path(directory), options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


def saved_tree(path: epath.PathLike):
  """The metadata tree of a directory saved like DIR/best_versions/<step> (StandardCheckpointer)."""
  with ocp.StandardCheckpointer() as reader:
    try:
      metadata = reader.metadata(path).item_metadata
    except (FileNotFoundError, ValueError) as e:
      metadata, why = None, f': {e}'
    else:
      why = ''
  if metadata is None:
    if (epath.Path(path) / integrity.STEP_METADATA).is_file():  # orbax saved it, once
      raise integrity.Damaged(f'{path} is damaged: orbax cannot read the metadata of its '
                              f'tree{why}.')
    raise FileNotFoundError(f'{path} holds no orbax checkpoint of a trainable tree (a directory '
                            f'saved like DIR/best_versions/<step>){why}.')
  return metadata.tree


def latest_step(directory: epath.PathLike) -> int | None:
  if not workdir_lib.path(directory).is_dir():
    return None
  with steps_reader(directory) as mgr:
    return mgr.latest_step()


def read_json(path: epath.PathLike) -> dict:
  """The JSON object in `path`, or {} when there is no such file."""
  return workdir_lib.read_json(path)


def check_base_saved(config, workdir):
  """Evaluation reloads, never rebuilds, what training saved: its tokenizer and stage-0 decoder."""
  if config.text_model:
    return
  needed, w = [], workdir_lib.path(workdir)
  if config.tokenizer == 'word_level':
    needed.append(w / workdir_lib.TOKENIZER)
  if config.get('pretrain', {}).get('epochs'):
    needed.append(w / workdir_lib.BASE_LM / workdir_lib.CONFIG)
  missing = [str(p) for p in needed if not p.exists()]
  if missing:
    raise FileNotFoundError(f'Workdir {workdir} lacks {missing}, which training saves and '
                            'evaluation reloads (the tokenizer built from the training '
                            "captions, the demo's pre-trained base decoder).")


def config_note(config, workdir, config_name) -> str:
  """The model-shaping entries where the workdir's config.json and `config` disagree."""
  path = workdir_lib.path(workdir) / workdir_lib.CONFIG
  if not path.is_file():
    return ''
  saved = trees.flatten(read_json(path), sep='.')
  given = trees.flatten(json.loads(config.to_json_best_effort()), sep='.')
  keys = sorted(k for k in saved.keys() | given.keys()
                if any(k == m or k.startswith(m + '.') for m in SHAPING_KEYS))
  diffs = [f'{k}={saved.get(k, "(absent)")!r} vs {given.get(k, "(absent)")!r}' for k in keys
           if saved.get(k) != given.get(k)]
  return (f' The config training ran with ({path}) vs {config_name}: {"; ".join(diffs)}.'
          if diffs else '')


# ----------------------------------------------------------------------------- plug-ins of runs


def plugin_from_workdir(workdir: str, context: int, *, checkpoint: str = 'best', name: str = '',
                        meta: Mapping[str, Any] | None = None) -> plugins.Plugin:
  """Context `context`'s plug-in of a training run: its `checkpoint` weights ('best', 'latest'
  or a directory saved like DIR/best), with the fingerprints of the decoder, encoder and
  connector the run used. The model is rebuilt from DIR/config.json as evaluation rebuilds it.
  """
  return plugin_from_run(restore_run(workdir, checkpoint), context, name=name, meta=meta)


def plugin_from_run(r: Restored, context: int, *, name: str = '',
                    meta: Mapping[str, Any] | None = None) -> plugins.Plugin:
  """Context `context`'s plug-in of a restored run."""
  config = r.exp.config
  tables = r.trainable.get('adaptors')
  if not tables:
    raise ValueError(f'The run in {r.workdir} trained no adaptor tables (peft.methods='
                     f'{r.exp.model.peft.methods}, train.mode={config.train.mode!r}).')
  params = r.variables['params']
  bases = plugins.model_bases(params, r.exp.model.decoder_cfg,
                              getattr(r.exp.model.encoder, 'cfg', None))
  context_map = config.data.get('context_map')
  if hasattr(context_map, 'to_dict'):  # rules as a ConfigDict
    context_map = context_map.to_dict()
  info = {'workdir': r.workdir, 'checkpoint': r.ckpt.kind, 'step': r.ckpt.step,
          'context': context, 'context_map': context_map,
          **dict(meta or {})}
  return plugins.extract(tables, r.exp.model.peft, context, bases, name=name, meta=info)


def write_plugins(workdir: str, peft) -> list[str]:
  """train.plugins: every adapted context's plug-in of the best weights, DIR/plugins/<context>
  (as `python -m cpeft_jax.plugins --workdir=DIR --context=N` writes it). On several hosts
  every one must call it (they restore the run together); process 0 writes."""
  run = restore_run(workdir)
  out = []
  for c in plugins.adapted_contexts(peft):
    plugin = plugin_from_run(run, c, name=f'context {c}')
    path = workdir_lib.path(workdir) / workdir_lib.PLUGINS / str(c)
    out.append(str(plugins.save(path, plugin) if hosts.is_lead() else path))
  logging.info('plug-ins of the best weights: %s', out)
  return out
