"""COCO captions through TFDS, end to end and offline.

TFDS's own `coco_captions` builder needs TensorFlow (its features use tf.int64) and a 20 GB
download, and `tfds.testing.mock_data` cannot fake its `captions` sequence (it draws text and
ids of different lengths). So the fixture prepares a tiny `coco_captions/2014` version 1.1.0 in a
temporary data_dir the way `tfds build` lays it out (dataset_info.json, features.json, array_record
shards; the same features, JPEG images), and the project's real loading code reads it.
"""

import io

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from cpeft_jax.data import sources
from cpeft_jax.data.demo import examples

SPLITS = {'train': 6, 'val': 3, 'test': 2, 'restval': 2}


def _scenes(split, n):
  """Drawn scenes for a COCO split (the demo's split names; its own seed per split)."""
  demo = {'val': 'validation', 'restval': 'train'}.get(split, split)
  return list(examples.generate_examples(demo, n, seed=list(SPLITS).index(split), image_size=48,
                                         captions_per_image=3))


def _jpeg(image):
  buf = io.BytesIO()
  PIL.Image.fromarray(image).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


with tfds.core.registered.skip_registration():

  class CocoCaptions(tfds.core.GeneratorBasedBuilder):
    """coco_captions' name, config, version and features, with drawn scenes as images."""
    name = 'coco_captions'
    VERSION = tfds.core.Version(sources.COCO_VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='2014')]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(encoding_format='jpeg'),
          'image/filename': tfds.features.Text(),
          'image/id': np.int64,
          'objects': tfds.features.Sequence({
              'id': np.int64, 'area': np.int64, 'bbox': tfds.features.BBoxFeature(),
              'label': tfds.features.ClassLabel(num_classes=80), 'is_crowd': np.bool_}),
          'captions': tfds.features.Sequence({'text': np.str_, 'id': np.int64}),
      }), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, n) for split, n in SPLITS.items()}

    def _generate_examples(self, split, n):
      for i, ex in enumerate(_scenes(split, n)):
        image_id = 1000 * list(SPLITS).index(split) + i
        caps = ex['captions']
        yield image_id, {
            'image': _jpeg(ex['image']), 'image/filename': f'COCO_{split}_{image_id:012d}.jpg',
            'image/id': image_id,
            'objects': {'id': [], 'area': [], 'bbox': np.zeros((0, 4), np.float32),
                        'label': [], 'is_crowd': []},
            'captions': {'text': [c['text'] for c in caps],
                         'id': [10 * image_id + j for j in range(len(caps))]}}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  CocoCaptions(data_dir=d, file_format='array_record').download_and_prepare()
  return d


def test_coco_splits_read_through_tfds_with_all_references(data_dir):
  for split, n in SPLITS.items():
    s = sources.load('coco_captions', split, data_dir)
    assert len(s) == n and s.name == f'coco_captions/{split}'
    assert all(len(c) == 3 for c in s.captions)
  both = sources.load('coco_captions', 'train+restval', data_dir)
  assert len(both) == 8 and both.image_ids.tolist()[-2:] == [3000, 3001]
  val = sources.load('coco_captions', 'val', data_dir)
  want = _scenes('val', 3)
  assert val.captions == [[c['text'] for c in e['captions']] for e in want]
  assert val.image_ids.tolist() == [1000, 1001, 1002]
  image = val.image(0)
  assert image.shape == (48, 48, 3) and image.dtype == np.uint8
  assert np.abs(image.astype(int) - want[0]['image']).mean() < 8  # JPEG round trip


def test_coco_missing_split_or_data_dir_is_a_clear_error(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"no split 'validation'.*'restval'"):
    sources.load('coco_captions', 'validation', data_dir)
  with pytest.raises(ValueError, match=r"no split 'extra'"):
    sources.load('coco_captions', 'train+extra', data_dir)
  with pytest.raises(RuntimeError, match='coco_captions/2014:1.1.0.*tfds build coco_captions'):
    sources.load('coco_captions', 'val', str(tmp_path / 'empty'))


def test_coco_batches_and_a_forward_pass_with_loss(data_dir, tmp_path):
  from configs import demo
  from cpeft_jax import experiment, losses
  config = demo.get_config('pretrain_epochs=0')
  config.data.update(dataset='coco_captions', data_dir=data_dir, train_split='train',
                     eval_split='val')
  config.vision.image_size = 32
  config.model.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
  config.train.batch_size, config.eval.batch_size = 2, 2
  train = experiment.open_split(config, str(tmp_path), 'train')
  exp = experiment.build(config, str(tmp_path), train)
  data = exp.batches(train, train=True)
  assert len(data) == 6 * 3 // 2  # one example per (image, caption) pair
  batch = next(iter(data.epoch(0)))
  assert batch['pixels'].shape == (2, 32, 32, 3)
  assert batch['tokens'].shape == (2, config.data.seq_len)
  out = jax.jit(lambda v, b: losses.eval_step(v, {}, b, apply_fn=_apply(exp)))(
      exp.variables, experiment.device_batch(exp, batch))
  loss = float(out['loss_sum']) / float(out['tokens'])
  assert np.isfinite(loss) and float(out['tokens']) == batch['loss_mask'].sum()
  # An untrained model is close to uniform over the vocabulary.
  assert abs(loss - np.log(exp.model.decoder_cfg.vocab_size)) < 1.0


def _apply(exp):
  from cpeft_jax.models import vlm
  return vlm.apply_fn(exp.model)
