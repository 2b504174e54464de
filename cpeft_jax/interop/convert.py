"""Conversions between plug-ins, PyTorch PEFT adapters and merged checkpoints, and their CLI.

Plug-ins (cpeft_jax/plugins/) are the interchange of the command line, which loads the frozen base
checkpoint, checks the plug-in against it, and converts:

    python -m cpeft_jax.interop.convert --base=CKPT --plugin=DIR --peft_out=ADAPTER  # to PEFT
    python -m cpeft_jax.interop.convert --base=CKPT --plugin=DIR --merged_out=HF_DIR  # merged
    python -m cpeft_jax.interop.convert --base=CKPT --peft_in=ADAPTER --plugin_out=DIR  # PEFT in
"""

from __future__ import annotations

import os
import pathlib

import jax

from cpeft_jax import checkpoints, plugins
from cpeft_jax.interop.merge import save_merged
from cpeft_jax.interop.peft_format import export_peft, import_peft, peft_config_of
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import init_adaptors


def plugin_from_peft(directory: str | os.PathLike, cfg: DecoderConfig, params, name: str = ''):
  """A PyTorch PEFT LoRA adapter as a plug-in of the base (`cfg`, `params`) it was made for."""
  peft = peft_config_of(directory, cfg)
  shapes = jax.eval_shape(lambda: init_adaptors(cfg, peft))
  zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes)
  tables = import_peft(directory, zeros, cfg, peft, 0)
  return plugins.extract(tables, peft, 0, {'decoder': plugins.fingerprint(params, cfg)},
                         name=name, meta={'from_peft': str(directory)})


def convert(base: str, *, plugin: str | None = None, peft_in: str | None = None,
            peft_out: str | None = None, merged_out: str | None = None,
            plugin_out: str | None = None, name: str = '') -> list[pathlib.Path]:
  """The command line's work: one source (a plug-in or a PEFT adapter), any outputs."""
  if (plugin is None) == (peft_in is None):
    raise ValueError('Give exactly one source: --plugin=DIR or --peft_in=ADAPTER_DIR.')
  if not (peft_out or merged_out or plugin_out):
    raise ValueError('Give at least one output: --peft_out, --merged_out or --plugin_out.')
  loaded = checkpoints.load_decoder(base, strict=True)
  cfg, params = loaded.config, loaded.params
  if plugin is not None:
    plug = plugins.load(plugin, {'decoder': plugins.fingerprint(params, cfg)})
  else:
    plug = plugin_from_peft(peft_in, cfg, params, name)
  written = []
  if plugin_out:
    written.append(plugins.save(plugin_out, plug))
  if peft_out:
    written.append(export_peft(peft_out, plug.tables, cfg, plug.peft, 0,
                               base_model_name_or_path=str(base)))
  if merged_out:
    written.append(save_merged(merged_out, params, plug.tables, cfg, plug.peft, 0))
  return written


def main(argv):
  del argv
  for path in convert(FLAGS.base, plugin=FLAGS.plugin, peft_in=FLAGS.peft_in,
                      peft_out=FLAGS.peft_out, merged_out=FLAGS.merged_out,
                      plugin_out=FLAGS.plugin_out, name=FLAGS.name):
    print(f'wrote {path}')


if __name__ == '__main__':
  from absl import app, flags
  FLAGS = flags.FLAGS
  flags.DEFINE_string('base', None, 'The frozen base: a Hugging Face checkpoint directory or id.')
  flags.DEFINE_string('plugin', None, 'Source: a plug-in directory (plugins.save).')
  flags.DEFINE_string('peft_in', None, 'Source: a PyTorch PEFT LoRA adapter directory.')
  flags.DEFINE_string('peft_out', None, 'Write a PyTorch PEFT LoRA adapter here.')
  flags.DEFINE_string('merged_out', None, 'Write a merged Hugging Face checkpoint here.')
  flags.DEFINE_string('plugin_out', None, 'Write a plug-in here.')
  flags.DEFINE_string('name', '', 'Name of a plug-in made from a PEFT adapter.')
  flags.mark_flags_as_required(['base'])
  app.run(main)
