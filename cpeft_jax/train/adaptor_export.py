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
import shutil

import jax
import ml_collections
import numpy as np
import safetensors.numpy

from cpeft_jax import experiment, hosts, runs, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax import workdir as workdir_lib

WEIGHTS, INFO = 'trainable.safetensors', 'export.json'
CONFIG, TOKENIZER = workdir_lib.CONFIG, workdir_lib.TOKENIZER


def _trainable(workdir: str, checkpoint: str):
  """(trainable tree as numpy, info) of DIR/best or of the latest managed checkpoint."""
  if checkpoint not in runs.CHECKPOINTS:
    raise ValueError(f"--checkpoint={checkpoint!r}; expected 'best' or 'latest'.")
  ckpt = runs.find_checkpoint(workdir, checkpoint)
  tree = runs.read_trainable(ckpt)
  if ckpt.kind == 'best':
    return tree, {'source': 'best', **runs.read_json(ckpt.path + '.json')}
  return tree, {'source': 'latest', 'step': int(ckpt.step)}


def export(workdir: str, checkpoint: str = 'best') -> str:
  """Writes DIR/export (replacing an older export) and returns its path. On several hosts
  every one must call it (they read the weights together); process 0 writes."""
  workdir = os.path.abspath(workdir)
  cfg_path = os.path.join(workdir, CONFIG)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f'{cfg_path} is missing: {workdir} is not a training workdir.')
  with open(cfg_path) as f:
    config = json.load(f)
  tree, info = _trainable(workdir, checkpoint)
  flat = {k: np.asarray(v) for k, v in trees.flatten(tree).items()}
  out = os.path.join(workdir, workdir_lib.EXPORT)
  if not hosts.is_lead():
    return out
  if not config.get('text_model') and config.get('pretrain', {}).get('epochs'):
    config['text_model'] = os.path.join(workdir, workdir_lib.BASE_LM)  # the demo's stage-0 decoder
  for d, key in ((config, 'text_model'), (config.get('vision', {}), 'path')):
    if d.get(key) and os.path.isdir(d[key]):  # a local directory, not a hub id
      d[key] = os.path.abspath(d[key])

  tmp = out + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  safetensors.numpy.save_file(flat, os.path.join(tmp, WEIGHTS))
  with open(os.path.join(tmp, CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  if os.path.isdir(os.path.join(workdir, TOKENIZER)):
    shutil.copytree(os.path.join(workdir, TOKENIZER), os.path.join(tmp, TOKENIZER))
  info.update(parameters=int(sum(v.size for v in flat.values())),
              bytes=os.path.getsize(os.path.join(tmp, WEIGHTS)))
  with open(os.path.join(tmp, INFO), 'w') as f:
    json.dump(info, f, indent=2)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return out


def load(export_dir: str):
  """(experiment, variables): the model rebuilt from an export, with its trainable tables.

  Errors when the exported tensors do not fit the model the config builds.
  """
  export_dir = os.path.abspath(export_dir)
  with open(os.path.join(export_dir, CONFIG)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  exp = experiment.build(config, export_dir, None)
  init, frozen = trainable_lib.split_for(exp.variables, config)
  got = safetensors.numpy.load_file(os.path.join(export_dir, WEIGHTS))
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
  with open(os.path.join(out, INFO)) as f:
    info = json.load(f)
  print(f'exported {info["parameters"]:,} trainable parameters ({info["bytes"] / 1e6:.2f} MB, '
        f'{info["source"]} step {info.get("step")}) to {out}')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Training workdir to export from.', required=True)
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which weights to export.')
  app.run(main)
