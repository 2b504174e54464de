"""Evaluates a trained workdir per split: caption perplexity, generated captions scored with the
COCO metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE where its jars exist), attention
heatmaps; or compares evaluated workdirs in one table.

    python evaluate.py --config=configs/demo.py --workdir=/tmp/demo \
        [--checkpoint=best|latest|PATH] [--splits=validation,test] \
        [--num_beams=1] [--max_new_tokens=0] [--heatmaps=K] [--heatmap_layer=-1]
    python evaluate.py --compare=DIR1,DIR2,... [--compare_split=test] [--compare_output=t.md]

Pass the config (and overrides) training ran with: the checkpoint must fit its model.
--checkpoint: 'best' (the best-validation weights, DIR/best), 'latest' (the newest step in
DIR/checkpoints) or a directory saved like DIR/best. --splits defaults to data.eval_split.
Decoding: greedy unless --num_beams > 1; flags override config.eval.num_beams/max_new_tokens.
Writes DIR/eval/metrics.json (every split), and per split <split>_metrics.json and
<split>_captions.json (COCO results format); --heatmaps=K writes the heatmaps of the first K
generated captions of each split to DIR/eval/heatmaps/.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

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
FLAGS = flags.FLAGS


def _config_name() -> str:
  name = config_flags.get_config_filename(FLAGS['config'])
  overrides = config_flags.get_override_values(FLAGS['config'])
  return f'--config={name}' + (f' with overrides {overrides}' if overrides else '')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.compare:
    from cpeft_jax.evaluation import compare
    compare.write(FLAGS.compare, FLAGS.compare_split, FLAGS.compare_output)
    return
  if not FLAGS['verbosity'].present:  # keep the console to our metrics, not orbax's progress
    logging.set_verbosity(logging.WARNING)
  import dataclasses
  from cpeft_jax.evaluation import captioning, captions, perplexity
  if FLAGS.heatmaps < 0:
    raise app.UsageError(f'--heatmaps must be >= 0, got {FLAGS.heatmaps}.')
  decoding = captioning.Decoding.from_config(FLAGS.config, num_beams=FLAGS.num_beams,
                                             max_new_tokens=FLAGS.max_new_tokens)
  r = perplexity.restore(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                         config_name=_config_name())
  if FLAGS.heatmaps:
    captioning.check_layer(r, FLAGS.heatmap_layer)
  data = perplexity.open_splits(FLAGS.config, FLAGS.workdir, FLAGS.splits)
  ckpt = dataclasses.asdict(r.ckpt)
  used = dataclasses.asdict(dataclasses.replace(
      decoding, max_new_tokens=captioning.max_new_tokens(r, decoding)))
  result = {'checkpoint': ckpt, 'splits': {}}
  scorer = captions.Scorer() if FLAGS.captions else None
  try:
    for name, split in data.items():
      m = perplexity.split_perplexity(r, split, name=name)
      print(f"{name}: caption loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f} "
            f"({m['images']} images; {r.ckpt.kind} checkpoint, step {r.ckpt.step})")
      if scorer is not None:
        generated = captioning.generate_split(r, split, decoding, desc=f'{name} captions')
        m.update(captioning.score(scorer, split, generated))
        print(f'{name}: ' + ', '.join(f'{k} {m[k]:.4f}' for k in captions.METRICS +
                                      (captions.SPICE,) if k in m))
        _show(split, generated, FLAGS.show)
        paths = captioning.write_results(FLAGS.workdir, name, generated, {
            'checkpoint': ckpt, 'decoding': used, 'split': name, **m})
        print(f'wrote {paths[0]}, {paths[1]}')
        maps = captioning.write_heatmaps(r, split, name, generated, FLAGS.workdir,
                                         count=FLAGS.heatmaps, layer=FLAGS.heatmap_layer)
        if maps:
          print(f'wrote {len(maps)} heatmaps to {os.path.dirname(maps[0])}')
      result['splits'][name] = m
  finally:
    if scorer is not None:
      scorer.close()
  if FLAGS.captions:
    result['decoding'] = used
  print(f'wrote {perplexity.write_metrics(FLAGS.workdir, result)}')


def _show(split, generated, n):
  from cpeft_jax.evaluation import captioning
  refs = captioning.references(split)
  for g in generated[:n]:
    print(f'  image {g.image_id}: {g.text!r}')
    for ref in refs[g.image_id][:3]:
      print(f'      ref: {ref!r}')


if __name__ == '__main__':
  app.run(main)
