"""Evaluates a trained workdir per split: caption perplexity, generated captions scored with the
COCO metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE where its jars exist), attention
heatmaps; or compares evaluated workdirs in one table.

    python evaluate.py --config=configs/demo.py --workdir=/tmp/demo \
        [--checkpoint=best|latest|PATH] [--splits=validation,test] \
        [--num_beams=1] [--max_new_tokens=0] [--heatmaps=K] [--heatmap_layer=-1]
    python evaluate.py --compare=DIR1,DIR2,... [--compare_split=test] [--compare_output=t.md]

Pass the config (and overrides) training ran with: the checkpoint must fit its model. A config
with `variants` (the two-variant demo, configs/demo.py without contexts=) evaluates each
variant's run in DIR/<variant> and writes their comparison to DIR/comparison.md.
--checkpoint: 'best' (the best-validation weights, DIR/best), 'latest' (the newest step in
DIR/checkpoints) or a directory saved like DIR/best. --splits defaults to data.eval_split.
Decoding: greedy unless --num_beams > 1; flags override config.eval.num_beams/max_new_tokens.
Writes DIR/eval/metrics.json (every split), and per split <split>_metrics.json and
<split>_captions.json (COCO results format); --heatmaps=K writes the heatmaps of the first K
generated captions of each split to DIR/eval/heatmaps/.
A multi-task run (data.tasks such as ('caption', 'qa')) also reports each task's perplexity per
split (over its target tokens; metrics.json: splits.<split>.tasks.<task>); generated captions
are for caption-only runs, so it needs --nocaptions.

Multi-host: run the same command on every host, as train.py (--distributed, implied when
JAX_COORDINATOR_ADDRESS is set; --mesh). The frozen base is sharded by the partition rules as
in training; every host computes on its rows of each batch, the generated captions are gathered
to process 0, which scores them and writes every file. --heatmaps needs one process.
"""

import functools
import os

from absl import app, flags, logging
from ml_collections import config_flags

from cpeft_jax import hosts, schema

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (get_config(arg)).')
flags.DEFINE_string('workdir', 'workdirs/demo', 'Workdir that training wrote.')
flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a directory saved like DIR/best.")
flags.DEFINE_list('splits', None, "Splits to evaluate (default: the config's data.eval_split).")
flags.DEFINE_bool('captions', True, 'Generate and score captions (--nocaptions: perplexity only).')
flags.DEFINE_integer('num_beams', None, 'Beam width; 1 is greedy (default: config.eval or 1).')
flags.DEFINE_integer('max_new_tokens', None, 'Longest generated caption, EOS included (default: '
                     'config.eval, or 0: what a training row holds).')
flags.DEFINE_integer('heatmaps', 0, 'Write attention heatmaps of this many captions per split.')
flags.DEFINE_integer('heatmap_layer', -1, 'Decoder layer of the heatmaps (negative: from the end).')
flags.DEFINE_integer('show', 3, 'Generated captions to print per split, with their references.')
flags.DEFINE_list('compare', None, 'Only compare these evaluated workdirs in a markdown table.')
flags.DEFINE_string('compare_split', None, 'Split of the comparison (default: the first one).')
flags.DEFINE_string('compare_output', None, 'Also write the comparison table to this file.')
hosts.define_flags()
schema.define_mesh_flag()
FLAGS = flags.FLAGS


def _config_name() -> str:
  name = config_flags.get_config_filename(FLAGS['config'])
  overrides = config_flags.get_override_values(FLAGS['config'])
  return f'--config={name}' + (f' with overrides {overrides}' if overrides else '')


def print_tasks(result) -> None:
  """Each split's per-task perplexity of a multi-task run (nothing for a single task)."""
  for split, m in result['splits'].items():
    for task, t in m.get('tasks', {}).items():
      print(f"{split}: task {task}: loss {t['loss']:.4f}, perplexity {t['perplexity']:.3f} "
            f"({t['tokens']} target tokens)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.compare:
    from cpeft_jax.evaluation import compare
    compare.write(FLAGS.compare, FLAGS.compare_split, FLAGS.compare_output)
    return
  if not FLAGS['verbosity'].present:  # keep the console to our metrics, not orbax's progress
    logging.set_verbosity(logging.WARNING)
  hosts.start_from_flags()
  schema.apply_mesh_flag(FLAGS.config)
  from cpeft_jax.data import pipeline
  from cpeft_jax.evaluation import captioning
  schema.check(FLAGS.config)
  if FLAGS.heatmaps < 0 or (FLAGS.heatmaps and not FLAGS.captions):
    raise app.UsageError(f'--heatmaps={FLAGS.heatmaps}: expected a count >= 0, and heatmaps '
                         'are drawn for generated captions (not with --nocaptions).')
  tasks = pipeline.config_tasks(FLAGS.config)
  if FLAGS.captions and tasks != ('caption',):
    raise app.UsageError(f'data.tasks={tasks}: generated captions are scored for caption-only '
                         'runs; pass --nocaptions (perplexity per task).')
  decoding = captioning.Decoding.from_config(FLAGS.config, num_beams=FLAGS.num_beams,
                                             max_new_tokens=FLAGS.max_new_tokens)
  run = functools.partial(
      captioning.evaluate_workdir, checkpoint=FLAGS.checkpoint, splits=FLAGS.splits,
      decoding=decoding, captions=FLAGS.captions, heatmap_count=FLAGS.heatmaps,
      heatmap_layer=FLAGS.heatmap_layer, show=FLAGS.show, config_name=_config_name())
  if not FLAGS.config.get('variants'):
    print_tasks(run(FLAGS.config, FLAGS.workdir))
    return
  # The two-variant demo trained one run per context map in DIR/<variant>: evaluate each and
  # compare them.
  from cpeft_jax import demo
  from cpeft_jax.evaluation import compare
  workdirs = []
  for variant in FLAGS.config.variants:
    workdirs.append(os.path.join(FLAGS.workdir, variant))
    print(f'== variant {variant!r} ({workdirs[-1]})')
    print_tasks(run(demo.variant_config(FLAGS.config, FLAGS.workdir, variant), workdirs[-1]))
  compare.write(workdirs, output=os.path.join(FLAGS.workdir, 'comparison.md'))


def _main(argv):
  with schema.exit_on_config_error():
    main(argv)


if __name__ == '__main__':
  app.run(_main, flags_parser=schema.parse_flags)
