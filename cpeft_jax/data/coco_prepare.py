"""Prepares TFDS's coco_captions/2014 (1.1.0, Karpathy splits) without TensorFlow.

  python -m cpeft_jax.data.coco_prepare --images=train2014.zip,val2014.zip \\
      --karpathy=dataset_coco.json --data_dir=DIR

reads the official COCO 2014 image zips (or their extracted folders) and Karpathy's split JSON
and writes DIR/coco_captions/2014/1.1.0/ as `tfds build coco_captions --file_format=array_record`
lays it out, for `sources.load('coco_captions', ...)`. TFDS's own pieces do the work, none of
which needs TensorFlow: the features of TFDS's CocoCaptions builder (np.int64 standing in for the
tf.int64 of its `_info`), its example serializer (protobuf), its key hashing (a split's examples
in the md5 order of their file names salted with the split's name, as its shuffler orders them),
its shard count for a split's serialized size (ShardConfig), its array_record file adapter and
its DatasetInfo (dataset_info.json, features.json, label names). Images are stored as the bytes
of their JPEG files, as TFDS stores a path. One difference: 'objects' (COCO's boxes and labels,
from the instances annotations, which this does not read) is empty; the loader reads neither.

Streaming and resumable: an image is read from its zip member or file when its example is
written; each shard is written under a temporary name, renamed when complete and recorded in
`coco_prepare.json`, so a rerun skips the finished shards and splits. Everything happens in
`incomplete.cpeft_1.1.0/`, renamed to `1.1.0/` once every split is done. An image that is
missing or does not decode is left out, counted and named in the log and in coco_prepare.json,
which stays beside the shards as the record of what was left out.
"""

from __future__ import annotations

import io
import json
import os
import types
import zipfile
from collections.abc import Iterator, Sequence
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core import file_adapters, hashing
from tensorflow_datasets.core.utils import shard_utils
from tensorflow_datasets.object_detection import coco, coco_captions

from cpeft_jax.data import sources

SPLITS = ('train', 'val', 'test', 'restval')
STATE = 'coco_prepare.json'
# COCO's 80 object categories in the order of their ids, the names TFDS's build gives 'label'.
LABELS = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')


with tfds.core.registered.skip_registration():

  class CocoCaptions(coco_captions.CocoCaptions):
    """TFDS's coco_captions builder (name, config, version, features, description), whose
    `_info` runs without TensorFlow; used for its DatasetInfo only, never to generate."""
    __module__ = coco_captions.__name__  # dataset_info.json's moduleName, as tfds build writes

    def _info(self):
      with mock.patch.object(coco, 'tf', types.SimpleNamespace(int64=np.int64)):
        info = super()._info()
      info.features['objects']['label'].names = list(LABELS)
      return info


class Images:
  """JPEG bytes by file name from COCO zips and folders (searched in order; a file's first
  place wins). Zips stay open and are read one member at a time."""

  def __init__(self, places: Sequence[str]):
    self._zips, self._where = [], {}
    for place in places:
      if os.path.isdir(place):
        for folder, _, files in os.walk(place):
          for f in files:
            self._where.setdefault(f, os.path.join(folder, f))
      elif zipfile.is_zipfile(place):
        z = zipfile.ZipFile(place)
        self._zips.append(z)
        for info in z.infolist():
          if not info.is_dir():
            self._where.setdefault(os.path.basename(info.filename), (z, info))
      else:
        raise ValueError(f'--images entry {place!r} is neither a folder nor a zip file; expected '
                         'COCO 2014 image zips (train2014.zip, val2014.zip) or their folders.')

  def size(self, name: str) -> int | None:
    """The file's size in bytes, None if it is in no zip or folder."""
    where = self._where.get(name)
    if where is None:
      return None
    return where[1].file_size if isinstance(where, tuple) else os.path.getsize(where)

  def read(self, name: str) -> bytes:
    where = self._where[name]
    if isinstance(where, tuple):
      return where[0].read(where[1])
    with open(where, 'rb') as f:
      return f.read()

  def close(self) -> None:
    for z in self._zips:
      z.close()


def _example(entry: dict, image: bytes) -> dict:
  """A coco_captions example as TFDS's builder yields it (objects empty)."""
  return {'image': image, 'image/filename': entry['filename'], 'image/id': entry['cocoid'],
          'objects': [],
          'captions': [{'id': s['sentid'], 'text': s['raw']} for s in entry['sentences']]}


def _karpathy(path: str) -> dict[str, list[dict]]:
  """Karpathy's images by split; an entry lacking what an example needs is an error."""
  try:
    with open(path, encoding='utf-8') as f:
      images = json.load(f)['images']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'--karpathy={path!r}: expected Karpathy\'s dataset_coco.json '
                     f'({{"images": [{{"filename", "cocoid", "split", "sentences"}}]}}): '
                     f'{type(e).__name__}: {e}') from e
  by_split = {s: [] for s in SPLITS}
  for i, im in enumerate(images):
    ok = (isinstance(im, dict) and isinstance(im.get('filename'), str)
          and isinstance(im.get('cocoid'), int) and im.get('split') in by_split
          and isinstance(im.get('sentences'), list) and all(
              isinstance(s, dict) and isinstance(s.get('raw'), str)
              and isinstance(s.get('sentid'), int) for s in im['sentences']))
    if not ok:
      raise ValueError(f'--karpathy={path!r}: images[{i}] is {str(im)[:200]}; expected '
                       '{"filename": str, "cocoid": int, "split": one of '
                       f'{list(SPLITS)}, "sentences": [{{"raw": str, "sentid": int}}, ...]}}.')
    by_split[im['split']].append(im)
  return by_split


def _check_image(data: bytes) -> str | None:
  """None if the bytes decode in full (as the loader will), else why."""
  try:
    sources.decode_image(io.BytesIO(data), draft=True)
  except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
    return f'{type(e).__name__}: {e}'
  return None


def _write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)


def _plan(split: str, entries: list[dict], images: Images, features, num_shards: int):
  """The split's examples in TFDS's order, the ones whose image is missing, and the shard
  boundaries (TFDS's count for the serialized size, or `num_shards`)."""
  hasher = hashing.Hasher(split)  # TFDS's shuffler salts with the split's name
  found = sorted((e for e in entries if images.size(e['filename']) is not None),
                 key=lambda e: hasher.hash_key(e['filename']))
  missing = [e['filename'] for e in entries if images.size(e['filename']) is None]
  if not found:
    return found, missing, []
  if not num_shards:
    # The exact serialized size, as TFDS counts it: the example with zeros for its image bytes.
    total = sum(len(features.serialize_example(_example(e, bytes(images.size(e['filename'])))))
                for e in found)
    num_shards = shard_utils.ShardConfig().get_number_shards(total, len(found))
  return found, missing, list(shard_utils.get_shard_boundaries(
      len(found), min(num_shards, len(found))))


def _write_shard(path: str, entries: list[dict], images: Images, features, skipped: list):
  """Writes the shard's examples, leaving out (and appending to `skipped`) undecodable images;
  returns (examples written, their serialized bytes)."""
  counts = [0, 0]

  def examples() -> Iterator[tuple[str, bytes]]:
    for e in entries:
      data = images.read(e['filename'])
      problem = _check_image(data)
      if problem:
        logging.warning('coco_captions: image %s does not decode (%s); left out.',
                        e['filename'], problem)
        skipped.append([e['filename'], problem])
        continue
      serialized = features.serialize_example(_example(e, data))
      counts[0] += 1
      counts[1] += len(serialized)
      yield e['filename'], serialized

  file_adapters.ArrayRecordFileAdapter.write_examples(path + '.tmp', examples())
  os.replace(path + '.tmp', path)
  return tuple(counts)


def prepare(images: Sequence[str], karpathy: str, data_dir: str, *, num_shards: int = 0) -> str:
  """Writes coco_captions/2014/1.1.0 under `data_dir` (see the module docstring); returns its
  folder. A finished folder is left as it is; an unfinished one is resumed."""
  builder = CocoCaptions(data_dir=data_dir, config='2014', file_format='array_record')
  final = os.fspath(builder.data_path)
  if os.path.isfile(os.path.join(final, 'dataset_info.json')):
    logging.info('coco_captions: %s is already prepared; nothing to do.', final)
    return final
  work = os.path.join(os.path.dirname(final), f'incomplete.cpeft_{os.path.basename(final)}')
  os.makedirs(work, exist_ok=True)
  state_path = os.path.join(work, STATE)
  state = {'splits': {}}
  if os.path.isfile(state_path):
    with open(state_path) as f:
      state = json.load(f)
  features = builder.info.features
  by_split = _karpathy(karpathy)
  sources_ = Images(images)
  split_infos = []
  try:
    for split in SPLITS:
      found, missing, bounds = _plan(split, by_split[split], sources_, features,
                                     state['splits'].get(split, {}).get('num_shards', num_shards))
      record = state['splits'].setdefault(split, {'num_shards': len(bounds), 'shards': {},
                                                  'missing': missing})
      if record['num_shards'] != len(bounds) or record['missing'] != missing:
        raise ValueError(f'coco_captions: {work} was begun from other inputs (split {split!r}: '
                         f'{record["num_shards"]} shards, {len(record["missing"])} missing '
                         f'images; now {len(bounds)}, {len(missing)}). Delete it to start over.')
      for name in missing:
        logging.warning('coco_captions: image %s of split %s is in none of %s; left out.', name,
                        split, list(images))
      if not bounds:
        logging.warning('coco_captions: split %s has no image; not written.', split)
        continue
      template = tfds.core.ShardedFileTemplate(data_dir=work, dataset_name=builder.name,
                                               split=split, filetype_suffix='array_record')
      for index, (start, stop) in enumerate(zip([0, *bounds[:-1]], bounds)):
        if str(index) in record['shards']:
          continue
        path = os.fspath(template.sharded_filepath(shard_index=index, num_shards=len(bounds)))
        skipped = []
        length, size = _write_shard(path, found[start:stop], sources_, features, skipped)
        record['shards'][str(index)] = {'length': length, 'num_bytes': size, 'skipped': skipped}
        _write_json(state_path, state)
        logging.info('coco_captions: %s written (%d examples, %d left out).',
                     os.path.basename(path), length, len(skipped))
      shards = [record['shards'][str(i)] for i in range(len(bounds))]
      split_infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=[s['length'] for s in shards],
          num_bytes=sum(s['num_bytes'] for s in shards), filename_template=template))
  finally:
    sources_.close()
  for f in os.listdir(work):  # what an interrupted write left (rewritten since)
    if f.endswith('.tmp'):
      os.remove(os.path.join(work, f))
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(work)
  os.replace(work, final)
  counts = {s: (len(r['missing']), sum(len(x['skipped']) for x in r['shards'].values()))
            for s, r in state['splits'].items()}
  logging.info('coco_captions: %s prepared; left out (missing, undecodable) by split: %s; '
               'named in %s.', final, counts, os.path.join(final, STATE))
  return final


def main(argv):
  del argv
  prepare(FLAGS.images, FLAGS.karpathy, FLAGS.data_dir, num_shards=FLAGS.num_shards)


if __name__ == '__main__':
  from absl import app, flags
  FLAGS = flags.FLAGS
  flags.DEFINE_list('images', None, 'COCO 2014 image zips (train2014.zip, val2014.zip) or '
                    'folders holding their JPEGs, comma-separated.')
  flags.DEFINE_string('karpathy', None, "Karpathy's split JSON (dataset_coco.json).")
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir to write coco_captions/2014/1.1.0 into.')
  flags.DEFINE_integer('num_shards', 0, 'Shards per split (0: as many as tfds build makes).')
  flags.mark_flags_as_required(['images', 'karpathy', 'data_dir'])
  app.run(main)
