"""Evaluates a Context-PEFT model: python evaluate.py --config=configs/<name>.py --workdir=DIR."""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).')
flags.DEFINE_string('workdir', None, 'Directory holding the checkpoints to evaluate.')


def main(argv):
  del argv
  raise SystemExit('evaluate.py: evaluation is not yet implemented (the evaluation issue).')


if __name__ == '__main__':
  app.run(main)
