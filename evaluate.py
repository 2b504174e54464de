"""Caption perplexity of a trained workdir, per split, written to DIR/eval/metrics.json.

    python evaluate.py --config=configs/demo.py --workdir=/tmp/demo \
        [--checkpoint=best|latest|PATH] [--splits=validation,test]

Pass the config (and overrides) training ran with: the checkpoint must fit its model.
--checkpoint: 'best' (the best-validation weights, DIR/best), 'latest' (the newest step in
DIR/checkpoints) or a directory saved like DIR/best. --splits defaults to data.eval_split.
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (get_config(arg)).')
flags.DEFINE_string('workdir', 'workdirs/demo', 'Workdir that training wrote.')
flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a directory saved like DIR/best.")
flags.DEFINE_list('splits', None, "Splits to evaluate (default: the config's data.eval_split).")
FLAGS = flags.FLAGS


def _config_name() -> str:
  name = config_flags.get_config_filename(FLAGS['config'])
  overrides = config_flags.get_override_values(FLAGS['config'])
  return f'--config={name}' + (f' with overrides {overrides}' if overrides else '')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # keep the console to our metrics, not orbax's progress
    logging.set_verbosity(logging.WARNING)
  from cpeft_jax.evaluation import perplexity
  result = perplexity.evaluate(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                               splits=FLAGS.splits, config_name=_config_name())
  path = perplexity.write_metrics(FLAGS.workdir, result)
  ckpt = result['checkpoint']
  for name, m in result['splits'].items():
    print(f"{name}: caption loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f} "
          f"({m['images']} images; {ckpt['kind']} checkpoint, step {ckpt['step']})")
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
