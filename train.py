"""Trains a Context-PEFT model: python train.py --config=configs/<name>.py --workdir=DIR."""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')


def main(argv):
  del argv
  raise SystemExit('train.py: training is not yet implemented (the training issue); for now '
                   'run `python -m cpeft_jax.params --config=...` for the parameter report.')


if __name__ == '__main__':
  app.run(main)
