"""Trains a Context-PEFT captioning model.

    python train.py --config=configs/demo.py --workdir=/tmp/demo [--config.peft.lora.rank=8]

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (get_config(arg)).')
flags.DEFINE_string('workdir', 'workdirs/demo', 'Directory for checkpoints and metrics.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # keep the console to our metrics, not orbax's progress
    logging.set_verbosity(logging.WARNING)
  from cpeft_jax.train import loop
  result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info('done: %s', result)
  print(f"best validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.3f} "
        f"after {result['steps']} steps; workdir {FLAGS.workdir}")


if __name__ == '__main__':
  app.run(main)
