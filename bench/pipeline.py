"""Input pipeline throughput: examples/s of CaptionBatches on the demo dataset.

    python -m bench.pipeline [--image_size=256 --batch=96 --batches=20 --workers=0]

Reads the demo's TFDS split, decodes PNGs, resizes to the paper's 256x256, augments (crop and
colour jitter), tokenizes and lays out captions, on the host only (no model), on a thread of
this process (--workers=0) or in worker processes (data.workers). The first batch, which pays
the workers' start, is timed apart. Not a test.
"""

import os
import tempfile
import time

from absl import app, flags

from cpeft_jax.data import pipeline, sources
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.data.demo import builder

FLAGS = flags.FLAGS
flags.DEFINE_integer('image_size', 256, 'Model input resolution (the paper: 256).')
flags.DEFINE_integer('batch', 96, 'Batch size (the paper: 96).')
flags.DEFINE_integer('batches', 20, 'Batches to time after one warm-up batch.')
flags.DEFINE_integer('workers', 0, 'Processes building batches (data.workers; 0: a thread).')
flags.DEFINE_string('data_dir', os.path.join(tempfile.gettempdir(), 'cpeft_bench_tfds'),
                    'Where the demo dataset is built.')


def main(argv):
  del argv
  split = sources.load('demo', 'train', FLAGS.data_dir, builder.make_config(num_train=1000))
  tok = tokenizer_lib.word_level(t for caps in split.captions for t in caps)
  data = pipeline.CaptionBatches(
      split, tok, batch_size=FLAGS.batch, num_image_tokens=64, seq_len=128,
      context_map='modality', image_size=FLAGS.image_size, train=True,
      augment=pipeline.AugmentConfig(flip=True, crop_min_scale=0.8, brightness=0.2,
                                     contrast=0.2, saturation=0.2),
      workers=FLAGS.workers)
  if len(data) < FLAGS.batches + 1:
    raise ValueError(f'The demo split has {len(data)} batches of {FLAGS.batch}; --batches='
                     f'{FLAGS.batches} needs {FLAGS.batches + 1}.')
  t_start = time.perf_counter()
  it = data.epoch(0)
  next(it)
  t0 = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(it)
  dt = time.perf_counter() - t0
  it.close()
  n = FLAGS.batches * FLAGS.batch
  how = f'{FLAGS.workers} worker processes' if FLAGS.workers else 'one prefetch thread'
  print(f'demo train pipeline, {FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch}, '
        f'flip+crop+jitter, {how}: {n / dt:.0f} examples/s '
        f'({dt / FLAGS.batches * 1e3:.0f} ms per batch; first batch {t0 - t_start:.1f} s; '
        f'{os.cpu_count()} CPUs)')


if __name__ == '__main__':
  app.run(main)
