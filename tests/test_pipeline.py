"""CaptionBatches: determinism, augmentation, host sharding, evaluation padding, validation
over every reference caption, worker processes (the same batches, stopped cleanly)."""

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

from cpeft_jax import experiment, losses
from cpeft_jax.data import layout, pipeline, tokenizer
from cpeft_jax.evaluation import perplexity
from cpeft_jax.models import vlm
from cpeft_jax.data.demo import examples
from cpeft_jax.data.sources import ImageFiles, Split
from helpers import VLM_DEC, VLM_PEFT, PatchEncoder  # the tiny vision-language model


@pytest.fixture(scope='module')
def split():
  exs = list(examples.generate_examples('train', 10, image_size=32, captions_per_image=3))
  return Split('demo/train', [{'image': e['image']} for e in exs],
               [[c['text'] for c in e['captions']] for e in exs],
               np.asarray([e['image/id'] for e in exs]))


def _data(split, **kw):
  tok = tokenizer.word_level(t for caps in split.captions for t in caps)
  args = dict(batch_size=4, num_image_tokens=4, seq_len=40, context_map='modality',
              image_size=32, train=True, seed=3)
  args.update(kw)
  return pipeline.CaptionBatches(split, tok, **args)


def test_batches_are_a_pure_function_of_seed_epoch_and_index(split):
  aug = pipeline.AugmentConfig(flip=True, crop_min_scale=0.6, brightness=0.3, contrast=0.3,
                               saturation=0.3)
  a, b = _data(split, augment=aug), _data(split, augment=aug)
  assert len(a) == 30 // 4
  x, y = a.batch(1, 2), b.batch(1, 2)
  for k in x:
    np.testing.assert_array_equal(x[k], y[k])
  streamed = list(b.epoch(1, start=2))
  np.testing.assert_array_equal(streamed[0]['pixels'], x['pixels'])
  assert len(streamed) == len(a) - 2
  assert not np.array_equal(a.batch(2, 2)['tokens'], x['tokens'])  # reshuffled per epoch


def test_augmentation_is_seeded_and_changes_pixels(split):
  img = split.image(0)
  cfg = pipeline.AugmentConfig(flip=True, crop_min_scale=0.5, brightness=0.4)
  one = pipeline.augment(img, np.random.default_rng(7), cfg)
  np.testing.assert_array_equal(one, pipeline.augment(img, np.random.default_rng(7), cfg))
  assert one.shape == img.shape and one.dtype == np.uint8
  outs = [pipeline.augment(img, np.random.default_rng(s), cfg) for s in range(6)]
  assert any(not np.array_equal(o, img) for o in outs)
  np.testing.assert_array_equal(pipeline.augment(img, np.random.default_rng(0),
                                                 pipeline.AugmentConfig()), img)


@pytest.mark.parametrize('hosts', [2, 3])
@pytest.mark.parametrize('train', [True, False])
def test_hosts_together_read_the_batches_of_one_host(split, hosts, train):
  """Host h's batch k is rows [h*b, (h+1)*b) of one host's batch k of hosts*b rows, augmented
  pixels included: a multi-host run trains on exactly the single-host run's batches."""
  aug = pipeline.AugmentConfig(flip=True, crop_min_scale=0.6, brightness=0.3)
  one = _data(split, train=train, batch_size=2 * hosts, augment=aug)
  parts = [_data(split, host=(h, hosts), train=train, batch_size=2, augment=aug)
           for h in range(hosts)]
  # 30 training pairs; 10 validation images, the last batch padded on every host.
  assert [len(d) for d in parts] == [len(one)] * hosts
  assert len(one) == (30 // (2 * hosts) if train else -(-10 // (2 * hosts)))
  for k in range(len(one)):
    want, got = one.batch(1, k), [d.batch(1, k) for d in parts]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], key)


def test_evaluation_pads_the_last_batch_with_masked_rows(split):
  d = _data(split, train=False, batch_size=4)  # 10 images: 4 + 4 + 2 (+2 padding)
  assert len(d) == 3
  last = d.batch(0, 2)
  np.testing.assert_array_equal(last['valid'], [True, True, False, False])
  assert last['loss_mask'][2:].sum() == 0 and last['loss_mask'][:2].sum() > 0
  assert last['context_ids'].max() == 1  # modality: image tokens are context 1


def test_truncation_is_counted(split):
  d = _data(split, seq_len=10, train=False, batch_size=10)  # room for 4 caption tokens
  d.batch(0, 0)
  assert d.truncated[0] == 10 and d.truncated[1] > 0


def test_bad_host_and_small_split_errors(split):
  with pytest.raises(ValueError, match=r'host=\(index=3, count=3\)'):
    _data(split, host=(3, 3))
  with pytest.raises(ValueError, match='fewer than one batch of 64'):
    _data(split, batch_size=64)


def _references_split():
  """Three 16x16 images with 3, 1 and 2 reference captions."""
  rng = np.random.default_rng(0)
  captions = [['a red square', 'the red box', 'a square'], ['two blue circles'],
              ['a green circle', 'one small green disc']]
  return Split('refs/val', [{'image': rng.integers(0, 256, (16, 16, 3), np.uint8)}
                            for _ in captions], captions, np.asarray([7, 8, 9]))


def test_all_references_perplexity_matches_each_pair_computed_alone():
  """eval.all_references: validation's token-weighted mean loss over every (image, caption)
  pair equals the one computed pair by pair, each on its own hand-built one-row batch; the
  default (first captions) equals the same sum over first captions only."""
  split = _references_split()
  tok = tokenizer.word_level(t for caps in split.captions for t in caps)
  model = vlm.VisionLanguageModel(PatchEncoder(), VLM_DEC, VLM_PEFT)
  common = dict(batch_size=4, num_image_tokens=4, seq_len=12, context_map='modality',
                image_size=16, train=False)
  first, every = (pipeline.CaptionBatches(split, tok, all_references=a, **common)
                  for a in (False, True))
  b0 = first.batch(0, 0)
  v = model.init(jax.random.key(0), b0['pixels'], b0['tokens'], b0['kinds'], b0['context_ids'])
  step = jax.jit(functools.partial(losses.eval_step, v, {}, apply_fn=vlm.apply_fn(model)))
  put = lambda b: {k: b[k] for k in experiment.BATCH_KEYS}
  assert (len(first), len(every)) == (1, 2)  # 3 and 6 rows, the last batch padded
  ids = tokenizer.special_ids(tok)
  sums = {}  # (image, caption) -> (loss sum, tokens), one row at a time
  for i, caps in enumerate(split.captions):
    pixels = (split.image(i)[None].astype(np.float32) / 255.0 - 0.5) / 0.5
    for j, cap in enumerate(caps):
      row = layout.layout_captions(tokenizer.encode(tok, [cap]), num_image_tokens=4, seq_len=12,
                                   bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad,
                                   context_map='modality')
      out = step(put(dict(row, pixels=pixels)))
      sums[i, j] = (float(out['loss_sum']), float(out['tokens']))
  for data, pairs in ((every, list(sums)), (first, [(i, 0) for i in range(3)])):
    want = sum(sums[p][0] for p in pairs) / sum(sums[p][1] for p in pairs)
    loss, ppl = perplexity.mean_loss(data, step, put)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(ppl, np.exp(want), rtol=1e-5)
  assert abs(perplexity.mean_loss(every, step, put)[0]
             - perplexity.mean_loss(first, step, put)[0]) > 1e-3  # the option changes the PPL
  # Experiment.batches takes the option from the config's eval.all_references (default False)
  # for evaluation only; caption generation asks for first captions explicitly.
  config = ml_collections.ConfigDict(dict(
      seed=0, train=dict(batch_size=4), eval=dict(batch_size=4),
      data=dict(seq_len=12, context_map='modality', augment={}),
      connector=dict(boundary_tokens=False)))
  exp = types.SimpleNamespace(config=config, tokenizer=tok, num_image_tokens=4, image_size=16,
                              image_mean=(0.5,) * 3, image_std=(0.5,) * 3, tasks=('caption',))
  batches = lambda **kw: experiment.Experiment.batches(exp, split, **kw)._pairs.shape[0]
  assert batches(train=False) == 3
  config.eval.all_references = True
  assert (batches(train=False), batches(train=True), batches(train=False, all_references=False)
          ) == (6, 6, 3)


def _copy(batch):
  """Plain numpy copies of a batch (workers' arrays live in shared memory until dropped)."""
  return {k: np.array(v) for k, v in batch.items()}


@pytest.mark.parametrize('train,epoch,start', [(True, 1, 0), (True, 2, 3), (False, 0, 0),
                                               (False, 0, 1)])
def test_worker_processes_give_the_same_batches(split, train, epoch, start):
  """data.workers=2 gives batch k of an epoch bit for bit as the in-process thread does,
  augmented or not, from the epoch's start or its middle; truncations count the same."""
  aug = pipeline.AugmentConfig(flip=True, crop_min_scale=0.6, brightness=0.3, contrast=0.3,
                               saturation=0.3)
  kw = dict(train=train, augment=aug, seq_len=12)  # 12: some captions are truncated
  ref, two = _data(split, **kw), _data(split, workers=2, **kw)
  want = [_copy(b) for b in ref.epoch(epoch, start=start)]
  got = [_copy(b) for b in two.epoch(epoch, start=start)]
  assert len(got) == len(want) == len(ref) - start > 0
  for x, y in zip(want, got):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype, k
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert two.truncated == ref.truncated and ref.truncated[0] > 0
  assert not multiprocessing.active_children()


def _workers_alive(pids):
  return [p for p in pids if _running(p)]


def _running(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie has exited
  except FileNotFoundError:
    return False


def test_workers_ignore_group_signals_and_stop_with_the_consumer(split):
  """Ctrl-C reaches the whole process group: the workers ignore it (the trainer saves at the
  next step boundary and needs its batches); a consumer that stops after 2 batches leaves no
  worker behind, running or zombie."""
  data = _data(split, workers=2)
  ref = [_copy(data.batch(0, k)) for k in range(4)]
  it = data.epoch(0)
  first = _copy(next(it))
  workers = multiprocessing.active_children()
  assert len(workers) == 2
  for w in workers:
    os.kill(w.pid, signal.SIGINT)
  second = _copy(next(it))
  for got, want in zip((first, second), ref):
    np.testing.assert_array_equal(got['pixels'], want['pixels'])
  it.close()
  assert not multiprocessing.active_children()
  assert not _workers_alive([w.pid for w in workers])
  for _ in zip(range(2), data.epoch(1)):  # a for loop left by break: the generator is dropped
    pass
  assert not multiprocessing.active_children()


def test_workers_exit_when_the_trainer_is_killed(tmp_path):
  """A trainer killed by SIGTERM (no handler: no clean-up runs) leaves no worker running."""
  script = textwrap.dedent(f"""
      import multiprocessing, os, signal, sys
      import numpy as np
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import test_pipeline
      from cpeft_jax.data.demo import examples
      from cpeft_jax.data.sources import Split
      if __name__ == '__main__':
        exs = list(examples.generate_examples('train', 10, image_size=32, captions_per_image=3))
        split = Split('demo/train', [{{'image': e['image']}} for e in exs],
                      [[c['text'] for c in e['captions']] for e in exs],
                      np.asarray([e['image/id'] for e in exs]))
        it = test_pipeline._data(split, workers=2).epoch(0)
        next(it)
        print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
      """)
  (tmp_path / 'trainer.py').write_text(script)
  run = subprocess.run([sys.executable, str(tmp_path / 'trainer.py')], capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == -signal.SIGTERM, run.stderr
  pids = [int(p) for p in run.stdout.split()]
  assert len(pids) == 2
  deadline = time.monotonic() + 30
  while _workers_alive(pids) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not _workers_alive(pids)


def test_a_worker_that_starts_after_its_parent_died_exits():
  """A worker still importing when the trainer is killed runs its start-up as an orphan: it
  must compare with the trainer's pid (taken in the trainer), not its parent at that time."""
  code = ('import time; from cpeft_jax.data import workers; '
          'workers._init_worker(1, 0, 1); time.sleep(60)')  # pid 1 is not its parent
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=50)
  assert run.returncode == 1, run.stderr


def test_a_corrupt_image_fails_the_same_way_in_a_worker(split, tmp_path):
  """An image that stopped decoding after load raises the error the thread path raises (its
  type and message name the file), not a worker crash."""
  paths = []
  for i in range(len(split)):
    paths.append(str(tmp_path / f'{i}.png'))
    PIL.Image.fromarray(split.image(i)).save(paths[-1])
  files = Split('folder/train', ImageFiles(paths), split.captions, split.image_ids)
  with open(paths[4], 'r+b') as f:  # cut the file short: PIL fails to decode it
    f.truncate(40)
  errors = []
  for workers in (0, 2):
    with pytest.raises(RuntimeError, match=r'4\.png \(index 4\) decoded at load time') as e:
      for _ in _data(files, train=False, workers=workers, batch_size=2).epoch(0):
        pass
    errors.append((type(e.value), str(e.value)))
  assert errors[0] == errors[1]
  assert not multiprocessing.active_children()


def test_bad_worker_count_is_an_error(split):
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match=r'data.workers must be an int >= 0'):
      _data(split, workers=bad)
