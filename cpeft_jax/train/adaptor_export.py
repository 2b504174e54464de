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

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from cpeft_jax.train import checkpointing

WEIGHTS, CONFIG, INFO, TOKENIZER = 'trainable.safetensors', 'config.json', 'export.json', 'tokenizer'


def _trainable(workdir: str, checkpoint: str):
  """(trainable tree as numpy, info) of DIR/best or of the latest managed checkpoint."""
  if checkpoint == 'best':
    path = os.path.join(workdir, checkpointing.BEST)
    if not os.path.isdir(path):
      raise FileNotFoundError(f'No best-validation weights at {path}; train first or pass '
                              '--checkpoint=latest.')
    with ocp.StandardCheckpointer() as ckpt:
      tree = ckpt.restore(path)
    with open(path + '.json') as f:
      return tree, {'source': 'best', **json.load(f)}
  if checkpoint != 'latest':
    raise ValueError(f"--checkpoint={checkpoint!r}; expected 'best' or 'latest'.")
  with checkpointing.manager(os.path.join(workdir, 'checkpoints')) as mgr:
    step = mgr.latest_step()
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {mgr.directory}; train first.')
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return out['state']['trainable'], {'source': 'latest', 'step': int(step)}


def export(workdir: str, checkpoint: str = 'best') -> str:
  """Writes DIR/export (replacing an older export) and returns its path."""
  workdir = os.path.abspath(workdir)
  cfg_path = os.path.join(workdir, CONFIG)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f'{cfg_path} is missing: {workdir} is not a training workdir.')
  with open(cfg_path) as f:
    config = json.load(f)
  tree, info = _trainable(workdir, checkpoint)
  flat = {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(tree, sep='/').items()}
  if not config.get('text_model') and config.get('pretrain', {}).get('epochs'):
    config['text_model'] = os.path.join(workdir, 'base_lm')  # the demo's stage-0 decoder
  for d, key in ((config, 'text_model'), (config.get('vision', {}), 'path')):
    if d.get(key) and os.path.isdir(d[key]):  # a local directory, not a hub id
      d[key] = os.path.abspath(d[key])

  out = os.path.join(workdir, 'export')
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
  from cpeft_jax.train import loop  # heavy: the model zoo and data pipeline
  from cpeft_jax.train import state as state_lib
  export_dir = os.path.abspath(export_dir)
  with open(os.path.join(export_dir, CONFIG)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  exp = loop.build(config, export_dir, None)
  init, frozen = state_lib.split(exp.variables, config.train.mode)
  want = flax.traverse_util.flatten_dict(init, sep='/')
  got = safetensors.numpy.load_file(os.path.join(export_dir, WEIGHTS))
  bad = sorted(set(want) ^ set(got)) + sorted(
      k for k in set(want) & set(got) if want[k].shape != got[k].shape)
  if bad:
    raise ValueError(f'{export_dir}/{WEIGHTS} does not fit the model its config builds: '
                     f'mismatched tensors {bad[:5]}{"..." if len(bad) > 5 else ""}.')
  trainable = flax.traverse_util.unflatten_dict(
      {k: jax.numpy.asarray(v) for k, v in got.items()}, sep='/')
  return exp, state_lib.merge(trainable, frozen)


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
