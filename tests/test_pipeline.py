"""CaptionBatches: determinism, augmentation, host sharding, evaluation padding."""

import numpy as np
import pytest

from cpeft_jax.data import pipeline, tokenizer
from cpeft_jax.data.demo import examples
from cpeft_jax.data.sources import Split


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


@pytest.mark.parametrize('hosts', [3, 4])
def test_hosts_read_disjoint_parts_covering_all_pairs(split, hosts):
  seen = []
  for host in range(hosts):
    d = _data(split, host=(host, hosts), train=False, batch_size=2)
    # Equal batch counts on every host (10 images over 4 hosts: shares 3, 3, 2, 2): a host
    # with fewer images runs padded batches instead of leaving the others waiting.
    assert len(d) == -(-(-(-10 // hosts)) // 2)
    for k in range(len(d)):
      b = d.batch(0, k)
      seen += b['image_ids'][b['valid']].tolist()
    train = _data(split, host=(host, hosts), batch_size=2)
    assert len(train) == (30 // hosts) // 2  # the smallest host share of the 30 pairs
    assert len({tuple(r) for r in train._order(0)[:len(train) * 2]}) == len(train) * 2
  assert sorted(seen) == sorted(split.image_ids.tolist())


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
