"""coco_prepare on a tiny COCO laid out as the official files are (train2014.zip, val2014.zip,
Karpathy's dataset_coco.json): the project's TFDS loader reads back the source annotations and
pixels, in TFDS's shuffled order; a bad image and a missing one are counted and named; an
interrupted run resumes without rewriting finished shards."""

import io
import json
import logging
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
from tensorflow_datasets.core import shuffle

from cpeft_jax.data import coco_prepare, sources

# (split, COCO folder, cocoid) of each fabricated image; Karpathy's val/test/restval are val2014.
IMAGES = [('train', 'train2014', i) for i in (9, 25, 30, 34, 36, 49)] + [
    ('val', 'val2014', i) for i in (42, 73, 74)] + [('test', 'val2014', i) for i in (133, 136)] + [
    ('restval', 'val2014', i) for i in (139, 143, 164)]
BAD = 'COCO_train2014_000000000030.jpg'  # a truncated JPEG
MISSING = 'COCO_val2014_000000000143.jpg'  # listed in the JSON, in no zip
GRAY = 'COCO_val2014_000000000074.jpg'  # COCO has some grayscale JPEGs


def _name(folder, cocoid):
  return f'COCO_{folder}_{cocoid:012d}.jpg'


def _jpeg(k, name):
  rng = np.random.default_rng(k)
  image = rng.integers(0, 256, (16 + k % 5, 20 + k % 7, 3), dtype=np.uint8)
  buf = io.BytesIO()
  im = PIL.Image.fromarray(image)
  (im.convert('L') if name == GRAY else im).save(buf, format='JPEG', quality=90)
  data = buf.getvalue()
  return data[:len(data) // 2] if name == BAD else data


@pytest.fixture
def coco(tmp_path):
  """The official layout: zips holding train2014/ and val2014/ folders, and dataset_coco.json."""
  entries, jpegs, sentid = [], {}, 0
  zips = {f: zipfile.ZipFile(tmp_path / f'{f}.zip', 'w') for f in ('train2014', 'val2014')}
  for k, (split, folder, cocoid) in enumerate(IMAGES):
    name = _name(folder, cocoid)
    jpegs[name] = _jpeg(k, name)
    if name != MISSING:
      zips[folder].writestr(f'{folder}/{name}', jpegs[name])
    raws = [f'Image {cocoid}, caption {j}: a thing in {split}.' for j in range(2 + k % 4)]
    sentences = [{'tokens': r.lower().split(), 'raw': r, 'imgid': k, 'sentid': sentid + j}
                 for j, r in enumerate(raws)]
    sentid += len(raws)
    entries.append({'filepath': folder, 'sentids': [s['sentid'] for s in sentences],
                    'filename': name, 'imgid': k, 'split': split, 'sentences': sentences,
                    'cocoid': cocoid})
  for z in zips.values():
    z.close()
  karpathy = tmp_path / 'dataset_coco.json'
  karpathy.write_text(json.dumps({'images': entries, 'dataset': 'coco'}))
  return {'images': [str(tmp_path / 'train2014.zip'), str(tmp_path / 'val2014.zip')],
          'karpathy': str(karpathy), 'entries': entries, 'jpegs': jpegs,
          'data_dir': str(tmp_path / 'tfds')}


def _check_read_back(coco):
  by_name = {e['filename']: e for e in coco['entries']}
  for split in coco_prepare.SPLITS:
    got = sources.load('coco_captions', split, coco['data_dir'])
    names = [e['filename'] for e in coco['entries'] if e['split'] == split
             and e['filename'] not in (BAD, MISSING)]
    # TFDS's own shuffler, salted with the split's name, gives `tfds build`'s order.
    shuffler = shuffle.Shuffler(coco['data_dir'], hash_salt=split, disable_shuffling=False)
    for n in names:
      shuffler.add(n, n.encode())
    order = [data.decode() for _, data in shuffler]
    assert list(got.image_ids) == [by_name[n]['cocoid'] for n in order]
    for i, n in enumerate(order):
      assert got.captions[i] == [s['raw'] for s in by_name[n]['sentences']]
      want = np.asarray(PIL.Image.open(io.BytesIO(coco['jpegs'][n])).convert('RGB'))
      np.testing.assert_array_equal(got.image(i), want)
      assert got.images[i]['image/filename'] == n.encode()


def test_prepare_reads_back_and_names_bad_images(coco, caplog):
  caplog.set_level(logging.WARNING)
  final = coco_prepare.prepare(coco['images'], coco['karpathy'], coco['data_dir'], num_shards=2)
  assert final == os.path.join(coco['data_dir'], 'coco_captions', '2014', '1.1.0')
  assert sorted(f for f in os.listdir(final) if 'array_record' in f) == sorted(
      f'coco_captions-{s}.array_record-0000{i}-of-00002' for s in coco_prepare.SPLITS
      for i in range(2))
  _check_read_back(coco)
  with open(os.path.join(final, coco_prepare.STATE)) as f:
    state = json.load(f)['splits']
  assert [name for s in state['train']['shards'].values() for name, _ in s['skipped']] == [BAD]
  assert state['restval']['missing'] == [MISSING]
  assert f'image {BAD} does not decode' in caplog.text
  assert f'image {MISSING} of split restval is in none of' in caplog.text
  # Folders instead of zips, TFDS's own shard count (1 for so little), the same examples.
  for z in coco['images']:
    zipfile.ZipFile(z).extractall(os.path.dirname(z))
  coco['data_dir'] += '_folders'
  folders = [os.path.join(os.path.dirname(z), f) for z, f in zip(coco['images'],
                                                                 ('train2014', 'val2014'))]
  final = coco_prepare.prepare(folders, coco['karpathy'], coco['data_dir'])
  assert 'coco_captions-train.array_record-00000-of-00001' in os.listdir(final)
  _check_read_back(coco)


def test_interrupted_run_resumes(coco, monkeypatch):
  check, calls = coco_prepare._check_image, []

  def interrupted(data):
    calls.append(1)
    if len(calls) == 5:  # in train's second shard, after its first was written
      raise KeyboardInterrupt
    return check(data)

  monkeypatch.setattr(coco_prepare, '_check_image', interrupted)
  with pytest.raises(KeyboardInterrupt):
    coco_prepare.prepare(coco['images'], coco['karpathy'], coco['data_dir'], num_shards=2)
  work = os.path.join(coco['data_dir'], 'coco_captions', '2014', 'incomplete.cpeft_1.1.0')
  assert os.path.isfile(os.path.join(work, 'coco_captions-train.array_record-00000-of-00002'))
  assert not os.path.exists(os.path.join(coco['data_dir'], 'coco_captions', '2014', '1.1.0'))
  with pytest.raises(RuntimeError, match='Cannot open TFDS'):
    sources.load('coco_captions', 'train', coco['data_dir'])

  monkeypatch.setattr(coco_prepare, '_check_image', check)
  written, write = [], coco_prepare._write_shard
  monkeypatch.setattr(coco_prepare, '_write_shard',
                      lambda path, *a: written.append(os.path.basename(path)) or write(path, *a))
  final = coco_prepare.prepare(coco['images'], coco['karpathy'], coco['data_dir'], num_shards=2)
  assert not [f for f in os.listdir(final) if f.endswith('.tmp')]
  assert 'coco_captions-train.array_record-00000-of-00002' not in written
  assert len(written) == 7  # every shard but the one finished before the interruption
  assert not os.path.exists(work)
  _check_read_back(coco)
  written.clear()
  coco_prepare.prepare(coco['images'], coco['karpathy'], coco['data_dir'], num_shards=2)
  assert not written  # prepared: nothing to do
