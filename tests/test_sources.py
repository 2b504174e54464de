"""Folder sources: COCO and Karpathy captions JSON, skipped entries, and batching over them."""

import json
import logging

import ml_collections
import numpy as np
import PIL.Image
import pytest

from cpeft_jax import experiment
from cpeft_jax.data import pipeline
from cpeft_jax.data import sources
from cpeft_jax.data import tokenizer as tokenizer_lib


def _rgb():
  """A smooth 12x10 colour image (smooth, so that its JPEG copy stays close)."""
  y, x = np.mgrid[0:12, 0:10]
  return np.stack([y * 20, x * 25, 255 - y * 10 - x * 5], -1).astype(np.uint8)


def _write_images(folder):
  """RGB PNG, greyscale PNG, RGBA PNG, an RGB JPEG in a subfolder, and random bytes as .jpg."""
  rng = np.random.default_rng(0)
  (folder / 'sub').mkdir(parents=True, exist_ok=True)
  rgb = _rgb()
  PIL.Image.fromarray(rgb).save(folder / 'a.png')
  PIL.Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8), 'L').save(folder / 'grey.png')
  PIL.Image.fromarray(rng.integers(0, 256, (9, 7, 4), np.uint8), 'RGBA').save(folder / 'rgba.png')
  PIL.Image.fromarray(rgb).save(folder / 'sub' / 'c.jpg', quality=95)
  (folder / 'corrupt.jpg').write_bytes(rng.integers(0, 256, 300, np.uint8).tobytes())


def _coco(tmp_path):
  _write_images(tmp_path)
  data = {
      'images': [
          {'id': 1, 'file_name': 'a.png'},
          {'id': 2, 'file_name': 'grey.png'},
          {'id': 3, 'file_name': 'rgba.png'},
          {'id': 4, 'file_name': 'corrupt.jpg'},
          {'id': 5, 'file_name': 'missing.png'},
          {'id': 6, 'file_name': 'sub/c.jpg'},
      ],
      'annotations': [
          {'image_id': 1, 'caption': 'a red square '},
          {'image_id': 2, 'caption': 'a grey image'},
          {'image_id': 1, 'caption': 'a small picture'},
          {'image_id': 2, 'caption': '   '},
          {'image_id': 3, 'caption': ''},  # rgba.png is left with no caption
          {'image_id': 4, 'caption': 'noise'},
          {'image_id': 5, 'caption': 'nothing here'},
          {'image_id': 6, 'caption': 'a copy in a subfolder'},
          {'image_id': 99, 'caption': 'no such image'},
      ],
  }
  path = tmp_path / 'captions.json'
  path.write_text(json.dumps(data))
  return path


def _karpathy(tmp_path):
  """Images under tmp_path/imgs, the JSON beside that folder."""
  _write_images(tmp_path / 'imgs')
  images = [
      {'filename': 'a.png', 'split': 'train', 'cocoid': 10,
       'sentences': [{'raw': 'a red square', 'tokens': ['a', 'red', 'square']}]},
      {'filename': 'c.jpg', 'filepath': 'sub', 'split': 'restval', 'cocoid': 11,
       'sentences': [{'raw': 'restval one'}, {'raw': 'restval two'}]},
      {'filename': 'grey.png', 'split': 'val', 'cocoid': 12,
       'sentences': [{'raw': 'a grey image'}]},
      {'filename': 'rgba.png', 'split': 'test', 'imgid': 13,
       'sentences': [{'raw': 'see-through'}, {'raw': ''}]},
      {'filename': 'corrupt.jpg', 'split': 'train', 'cocoid': 14,
       'sentences': [{'raw': 'noise'}]},
  ]
  path = tmp_path / 'dataset_coco.json'
  path.write_text(json.dumps({'dataset': 'coco', 'images': images}))
  return path


def test_coco_layout_captions_ids_and_skips(tmp_path, caplog):
  path = _coco(tmp_path)
  with caplog.at_level(logging.WARNING):
    split = sources.load('folder', 'train', captions_json=str(path))
  assert split.name == 'folder/train'
  assert split.image_ids.tolist() == [1, 2, 6]
  assert split.captions == [['a red square', 'a small picture'], ['a grey image'],
                            ['a copy in a subfolder']]
  assert split.skipped == {'empty_captions': 2, 'uncaptioned_images': 1, 'missing_images': 1,
                           'corrupt_images': 1, 'orphan_captions': 1}
  text = caplog.text
  for name in ('grey.png', 'rgba.png', 'missing.png', 'corrupt.jpg'):
    assert str(tmp_path / name) in text, name
  assert 'a.png' not in text.replace('rgba.png', '')
  assert 'skipped' in caplog.records[-1].getMessage()  # one summary last


def test_images_are_rgb_uint8(tmp_path):
  split = sources.load('folder', 'x', captions_json=str(_coco(tmp_path)))
  rgb = _rgb()
  a, grey, c = (split.image(i) for i in range(3))
  np.testing.assert_array_equal(a, rgb)
  assert grey.shape == (8, 8, 3) and grey.dtype == np.uint8
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  assert c.shape == (12, 10, 3) and c.dtype == np.uint8
  assert np.abs(c.astype(int) - rgb).mean() < 8  # JPEG, lossy
  rgba = sources.ImageFiles([str(tmp_path / 'rgba.png')])[0]['image']
  assert rgba.shape == (9, 7, 3) and rgba.dtype == np.uint8


def test_karpathy_split_selection(tmp_path, caplog):
  path = str(_karpathy(tmp_path))
  kw = dict(captions_json=path, image_dir=str(tmp_path / 'imgs'))
  with caplog.at_level(logging.WARNING):
    train = sources.load('folder', 'train', restval_in_train=True, **kw)
  assert train.image_ids.tolist() == [10, 11]  # restval joins train; the corrupt one is skipped
  assert train.captions == [['a red square'], ['restval one', 'restval two']]
  assert train.skipped['corrupt_images'] == 1
  assert str(tmp_path / 'imgs' / 'corrupt.jpg') in caplog.text
  assert train.image(1).shape == (12, 10, 3)  # found under its "filepath"

  only_train = sources.load('folder', 'train', **kw)  # the default: train only, as the paper
  assert only_train.image_ids.tolist() == [10]
  assert sources.load('folder', 'restval', **kw).image_ids.tolist() == [11]
  assert sources.load('folder', 'val', **kw).captions == [['a grey image']]
  test = sources.load('folder', 'test', **kw)
  assert test.image_ids.tolist() == [13] and test.captions == [['see-through']]
  assert test.skipped['empty_captions'] == 1 and not any(
      v for k, v in test.skipped.items() if k != 'empty_captions')
  with pytest.raises(ValueError, match=r"no image in split 'dev'.*'restval', 'test', 'train'"):
    sources.load('folder', 'dev', **kw)


def test_config_restval_option(tmp_path, monkeypatch):
  """data.restval (default False): a Karpathy JSON's restval images join train only when asked;
  coco_captions then opens TFDS's 'train+restval'. Evaluation splits never take them."""
  path = str(_karpathy(tmp_path))
  config = ml_collections.ConfigDict(dict(data=dict(
      dataset='folder', data_dir='', train_split='train', eval_split='val', captions_json=path,
      image_dir=str(tmp_path / 'imgs'))))
  open_ids = lambda name: experiment.open_split(config, str(tmp_path), name).image_ids.tolist()
  assert open_ids('train') == [10]  # no data.restval key: the default, train only
  config.data.restval = False
  assert open_ids('train') == [10]
  config.data.restval = True
  assert open_ids('train') == [10, 11] and open_ids('val') == [12]
  opened = []
  monkeypatch.setattr(sources, 'load', lambda dataset, name, *a, **kw: opened.append(
      (dataset, name, kw['restval_in_train'])))
  config.data.dataset = 'coco_captions'
  for restval in (False, True):
    config.data.restval = restval
    experiment.open_split(config, str(tmp_path), 'train')
    experiment.open_split(config, str(tmp_path), 'val')
  assert opened == [('coco_captions', 'train', False), ('coco_captions', 'val', False),
                    ('coco_captions', 'train+restval', True), ('coco_captions', 'val', True)]


def test_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='needs captions_json'):
    sources.load('folder', 'train')
  with pytest.raises(FileNotFoundError, match='nope.json'):
    sources.load('folder', 'train', captions_json=str(tmp_path / 'nope.json'))
  bad = tmp_path / 'bad.json'
  bad.write_text(json.dumps({'photos': [], 'texts': []}))
  with pytest.raises(ValueError, match=r"bad.json has an unknown layout.*'photos', 'texts'.*COCO"):
    sources.load('folder', 'train', captions_json=str(bad))
  bad.write_text(json.dumps({'images': [{'file': 'a.png', 'captions': ['x']}]}))
  with pytest.raises(ValueError, match=r'bad.json has an unknown layout.*Karpathy'):
    sources.load('folder', 'train', captions_json=str(bad))
  bad.write_text(json.dumps({'images': [{'file_name': 'a.png'}], 'annotations': []}))
  with pytest.raises(ValueError, match=r"bad.json: images\[0\] has no 'id'"):
    sources.load('folder', 'train', captions_json=str(bad))
  bad.write_text('{not json')
  with pytest.raises(ValueError, match='bad.json is not valid JSON'):
    sources.load('folder', 'train', captions_json=str(bad))
  bad.write_text(json.dumps({'images': [{'id': 1, 'file_name': 'gone.png'}],
                             'annotations': [{'image_id': 1, 'caption': 'x'}]}))
  with pytest.raises(ValueError, match='no usable image'):
    sources.load('folder', 'train', captions_json=str(bad))
  with pytest.raises(ValueError, match=r"Unknown dataset 'flickr'.*'folder'"):
    sources.load('flickr', 'train')


def test_decoding_failure_after_load_names_the_file(tmp_path):
  split = sources.load('folder', 'train', captions_json=str(_coco(tmp_path)))
  (tmp_path / 'grey.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')  # broken after the check
  with pytest.raises(RuntimeError, match=r'grey\.png.*cannot be decoded'):
    split.image(1)


def test_caption_batches_over_folder(tmp_path):
  split = sources.load('folder', 'train', captions_json=str(_coco(tmp_path)))
  tok = tokenizer_lib.word_level(c for caps in split.captions for c in caps)
  common = dict(tokenizer=tok, batch_size=2, num_image_tokens=4, seq_len=24,
                context_map='modality', image_size=16)
  train = pipeline.CaptionBatches(split, train=True, **common)
  assert len(train) == 2  # 4 (image, caption) pairs
  batches = list(train.epoch(0))
  assert len(batches) == 2
  for b in batches:
    assert b['pixels'].shape == (2, 16, 16, 3) and b['pixels'].dtype == np.float32
    assert b['tokens'].shape == (2, 24)
    assert set(b['image_ids'].tolist()) <= {1, 2, 6}
  evaluation = pipeline.CaptionBatches(split, train=False, **common)
  rows = [b for b in evaluation.epoch(0)]
  assert len(rows) == 2 and rows[1]['valid'].tolist() == [True, False]
  assert np.concatenate([b['image_ids'][b['valid']] for b in rows]).tolist() == [1, 2, 6]


def test_folder_split_is_caption_only(tmp_path):
  """A user's folder (like COCO) has only the 'caption' task: its texts are (empty prompt,
  caption) pairs, and asking it for 'qa' names the split and the tasks it has."""
  split = sources.load('folder', 'train', captions_json=str(_coco(tmp_path)))
  assert split.tasks == ('caption',)
  assert split.texts('caption') == [[('', c) for c in caps] for caps in split.captions]
  with pytest.raises(ValueError, match=r"Split 'folder/train' has no task 'qa'; it has "
                                       r"\['caption'\]"):
    split.texts('qa')
  tok = tokenizer_lib.word_level(split.corpus())
  with pytest.raises(ValueError, match=r"has no task 'qa'"):
    pipeline.CaptionBatches(split, tok, batch_size=2, num_image_tokens=4, seq_len=24,
                            context_map='modality', image_size=16, tasks=('caption', 'qa'))
