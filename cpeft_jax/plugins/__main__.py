"""Takes one context's plug-in out of a training run's workdir.

    python -m cpeft_jax.plugins --workdir=DIR [--checkpoint=best] --context=N --out=PLUGDIR
"""

from absl import app, flags, logging
import jax
import numpy as np

from cpeft_jax import runs
from cpeft_jax.plugins import plugin as plugin_lib

flags.DEFINE_string('workdir', None, 'Training workdir to take the plug-in from.', required=True)
flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a directory saved like DIR/best.")
flags.DEFINE_integer('context', None, 'The context whose adaptor group becomes the plug-in.',
                     required=True)
flags.DEFINE_string('out', None, 'Directory to write the plug-in to.', required=True)
flags.DEFINE_string('name', '', "The plug-in's name (e.g. its task).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # orbax's progress lines
    logging.set_verbosity(logging.WARNING)
  plugin = runs.plugin_from_workdir(FLAGS.workdir, FLAGS.context, checkpoint=FLAGS.checkpoint,
                                    name=FLAGS.name)
  out = plugin_lib.save(FLAGS.out, plugin)
  count = sum(np.size(x) for x in jax.tree.leaves(plugin.tables))
  print(f'plug-in {plugin.name or "(unnamed)"!r}: context {FLAGS.context} of {FLAGS.workdir} '
        f'({plugin.meta["checkpoint"]} step {plugin.meta["step"]}), {count:,} parameters, '
        f'methods {"+".join(plugin.peft.methods)}, bases {sorted(plugin.bases)} -> {out}')


if __name__ == '__main__':
  app.run(main)
