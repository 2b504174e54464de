"""Adaptor-only export of a training run: the trainable tables + connector and what rebuilds them.

    python -m cpeft_jax.train.adaptor_export --workdir=DIR [--checkpoint=best|latest]

writes DIR/export/: `trainable.safetensors` (the trainable tree, keys 'adaptors/decoder/...',
'params/connector/...'), `config.json` (the run's config, with text_model pointing at the
frozen base decoder it was trained on) and the tokenizer. The frozen base is not copied: it is
the pre-trained checkpoint (for the demo, DIR/base_lm written by stage 0); `load` rebuilds the
model from the config exactly as training built it and puts the exported tables in it.
"""

from __future__ import annotations

import json
import os

from etils import epath
import jax
import ml_collections
import numpy as np
import safetensors.numpy

from cpeft_jax import experiment, hosts, runs, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax import workdir as workdir_lib

WEIGHTS, INFO = 'trainable.safetensors', 'export.json'
CONFIG, TOKENIZER = workdir_lib.CONFIG, workdir_lib.TOKENIZER


def _trainable(workdir: epath.Path, checkpoint: str):
  """(trainable tree as numpy, info) of the best weights or of the latest managed checkpoint."""
  if checkpoint not in runs.CHECKPOINTS:
    raise ValueError(f"--checkpoint={checkpoint!r}; expected 'best' or 'latest'.")
  ckpt = runs.find_checkpoint(workdir, checkpoint)
  tree = runs.read_trainable(ckpt)
  if ckpt.kind == 'best':
    info = runs.read_json(workdir / workdir_lib.BEST_JSON)
    info.pop(workdir_lib.VERSION, None)
    return tree, {'source': 'best', **info}
  return tree, {'source': 'latest', 'step': int(ckpt.step)}


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
  """Copies directory `src` to `dst` file by file (epath has no copytree)."""
  dst.mkdir(parents=True, exist_ok=True)
  for p in src.iterdir():
    if p.is_dir():
      _copy_tree(p, dst / p.name)
    else:
      p.copy(dst / p.name, overwrite=True)


def export(workdir: epath.PathLike, checkpoint: str = 'best') -> str:
  """Writes DIR/export (replacing an older export) and returns its path.

  Locally the export is written to DIR/export.tmp and renamed into place; on an object store
  (no directory renames) it is written in place, export.json last, so a complete export is one
  that has export.json. On several hosts every one must call it (they read the weights
  together); process 0 writes.
  """
  w = workdir_lib.path(workdir)
  cfg_path = w / CONFIG
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{cfg_path} is missing: {w} is not a training workdir.')
  config = json.loads(cfg_path.read_text())
  tree, info = _trainable(w, checkpoint)
  flat = {k: np.asarray(v) for k, v in trees.flatten(tree).items()}
  out = w / workdir_lib.EXPORT
  if not hosts.is_lead():
    return str(out)
  if not config.get('text_model') and config.get('pretrain', {}).get('epochs'):
    config['text_model'] = str(w / workdir_lib.BASE_LM)  # the demo's stage-0 decoder
  for d, key in ((config, 'text_model'), (config.get('vision', {}), 'path')):
    if d.get(key) and workdir_lib.is_local(d[key]) and os.path.isdir(d[key]):  # not a hub id
      d[key] = os.path.abspath(d[key])

  local = workdir_lib.is_local(w)
  tmp = out.parent / (out.name + workdir_lib.TMP) if local else out
  if tmp.exists():
    tmp.rmtree()  # a leftover, or (object store) the older export
  tmp.mkdir(parents=True)
  weights = safetensors.numpy.save(flat)
  (tmp / WEIGHTS).write_bytes(weights)
  (tmp / CONFIG).write_text(json.dumps(config, indent=2))
  if (w / TOKENIZER).is_dir():
    _copy_tree(w / TOKENIZER, tmp / TOKENIZER)
  info.update(parameters=int(sum(v.size for v in flat.values())), bytes=len(weights))
  (tmp / INFO).write_text(json.dumps(info, indent=2))
  if local:
    if out.exists():
      out.rmtree()
    os.replace(tmp, out)
  return str(out)


def load(export_dir: epath.PathLike):
  """(experiment, variables): the model rebuilt from an export, with its trainable tables.

  Errors when the exported tensors do not fit the model the config builds.
  """
  export_dir = workdir_lib.path(export_dir)
  config = ml_collections.ConfigDict(json.loads((export_dir / CONFIG).read_text()))
  exp = experiment.build(config, str(export_dir), None)
  init, frozen = trainable_lib.split_for(exp.variables, config)
  got = safetensors.numpy.load((export_dir / WEIGHTS).read_bytes())
  trees.require_same_shapes(trees.shapes(trees.flatten(init)), trees.shapes(got),
                            f'{export_dir}/{WEIGHTS}', got_name='the export',
                            want_name='the model its config builds')
  trainable = trees.unflatten({k: jax.numpy.asarray(v) for k, v in got.items()})
  return exp, trainable_lib.merge(trainable, frozen)


def main(argv):
  from absl import flags, logging
  del argv
  if not flags.FLAGS['verbosity'].present:  # orbax's progress lines
    logging.set_verbosity(logging.WARNING)
  out = export(flags.FLAGS.workdir, flags.FLAGS.checkpoint)
  info = json.loads((epath.Path(out) / INFO).read_text())
  print(f'exported {info["parameters"]:,} trainable parameters ({info["bytes"] / 1e6:.2f} MB, '
        f'{info["source"]} step {info.get("step")}) to {out}')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Training workdir to export from.', required=True)
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which weights to export.')
  app.run(main)
