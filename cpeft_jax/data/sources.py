"""Caption datasets as random-access splits: the offline demo, COCO through TFDS, or a folder.

A `Split` gives an image by index (uint8 [H, W, 3]) and every image's reference captions,
read once with image decoding skipped. COCO uses TFDS's `coco_captions` (Karpathy splits:
train, val, test, restval), which must already be prepared in `data_dir`, by `tfds build` (which
needs TensorFlow) or from the COCO zips by `python -m cpeft_jax.data.coco_prepare` (which does
not); the demo builds itself on first use. A user's own data is a folder of images plus a
captions JSON in COCO or Karpathy layout. A malformed JSON entry (a
missing or non-string file name, one that leaves the image folder, a duplicate image id,
captions that are not a list of strings) is an error naming it. Unusable data (empty captions,
missing image files, images that do not decode in full) is skipped at load, each named in a
warning and counted in `Split.skipped`, so that an epoch never fails on them.

Every split has the task 'caption' (an empty prompt, a caption as target); the demo also has
'qa' (a question about the scene as prompt, its answer as target), derived from the scenes.
`Split.texts(task)` gives each image's (prompt, target) pairs of a task.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import logging

from cpeft_jax import hosts
from cpeft_jax.data import preprocess
from cpeft_jax.data.demo import builder, examples

DATASETS = ('demo', 'coco_captions', 'folder')
COCO_VERSION = '1.1.0'  # TFDS coco_captions (Karpathy splits) as prepared by `tfds build`
SKIP_KINDS = ('empty_captions', 'uncaptioned_images', 'missing_images', 'corrupt_images',
              'orphan_captions')


@dataclasses.dataclass
class Split:
  name: str
  images: Sequence  # random access; [i]['image'] is uint8 [H, W, 3]
  captions: list[list[str]]  # reference captions of each image
  image_ids: np.ndarray
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # kind -> count at load
  # Tasks beyond 'caption': name -> a function giving each image's (prompt, target) pairs,
  # called on first use (the demo derives its questions from the scenes).
  task_sources: dict[str, Callable[[], list[list[tuple[str, str]]]]] = dataclasses.field(
      default_factory=dict)
  _task_texts: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                        compare=False)

  def __len__(self) -> int:
    return len(self.captions)

  def image(self, index: int) -> np.ndarray:
    return np.asarray(self.images[index]['image'])

  @property
  def tasks(self) -> tuple[str, ...]:
    return ('caption', *self.task_sources)

  def texts(self, task: str) -> list[list[tuple[str, str]]]:
    """(prompt, target) pairs of each image for `task`; captions have an empty prompt."""
    if task == 'caption':
      return [[('', c) for c in caps] for caps in self.captions]
    if task not in self.task_sources:
      raise ValueError(f'Split {self.name!r} has no task {task!r}; it has {list(self.tasks)} '
                       f"(the tasks of all datasets: {list(TASKS)}; 'qa' is the demo's).")
    if task not in self._task_texts:
      texts = self.task_sources[task]()
      if len(texts) != len(self):
        raise ValueError(f'Task {task!r} of split {self.name!r} gives texts for {len(texts)} '
                         f'images; the split has {len(self)}.')
      self._task_texts[task] = texts
    return self._task_texts[task]

  def corpus(self, tasks: Sequence[str] = ('caption',)) -> Iterator[str]:
    """Every text of the tasks (prompts and targets), e.g. to build a vocabulary from."""
    for task in tasks:
      for pairs in self.texts(task):
        for prompt, target in pairs:
          if prompt:
            yield prompt
          yield target


TASKS = ('caption', 'qa')


def _texts(example) -> list[str]:
  texts = example['captions']['text']
  return [t.decode() if isinstance(t, bytes) else str(t) for t in texts]


def load(dataset: str, split: str, data_dir: str | None = None, demo_config=None, *,
         captions_json: str | None = None, image_dir: str | None = None,
         restval_in_train: bool = False) -> Split:
  """Opens one split; errors name the dataset or split and list what exists.

  dataset='folder' reads `captions_json` (COCO or Karpathy layout, told apart by its keys) with
  images under `image_dir` (default: the JSON's folder); see `load_folder`.
  """
  if dataset == 'folder':
    if captions_json is None:
      raise ValueError("dataset='folder' needs captions_json (a COCO or Karpathy captions JSON).")
    return load_folder(captions_json, split, image_dir, restval_in_train=restval_in_train)
  if dataset == 'demo':
    make = lambda: builder.CpeftDemoCaptions(config=demo_config or builder.make_config(),
                                             data_dir=data_dir, file_format='array_record')
    # One host builds the files every host then reads.
    hosts.lead_then_all(lambda: make().download_and_prepare(),
                        f'Building the demo dataset in {data_dir}')
    b = make()
  elif dataset == 'coco_captions':
    # Naming the version makes TFDS read the prepared files (dataset_info.json, features.json,
    # array_record shards) without running the builder's code, which needs TensorFlow.
    name = f'coco_captions/2014:{COCO_VERSION}'
    try:
      b = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    except Exception as e:  # noqa: BLE001 - TFDS raises many types here
      raise RuntimeError(f'Cannot open TFDS {name} in data_dir={data_dir!r}: {e}. '
                         'Prepare it once from the COCO 2014 zips and Karpathy\'s '
                         'dataset_coco.json (python -m cpeft_jax.data.coco_prepare --images=... '
                         '--karpathy=... --data_dir=...), or with TensorFlow installed '
                         '(tfds build coco_captions --file_format=array_record).') from e
  else:
    raise ValueError(f'Unknown dataset {dataset!r}; expected one of {DATASETS}.')
  for part in split.split('+'):  # TFDS split expressions such as 'train+restval'
    if part.split('[')[0] not in b.info.splits:
      raise ValueError(f'Dataset {dataset!r} has no split {part!r}; it has '
                       f'{sorted(b.info.splits)}.')
  meta = b.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  captions = [_texts(meta[i]) for i in range(len(meta))]
  empty = [i for i, c in enumerate(captions) if not c]
  if empty:
    raise ValueError(f'{dataset}/{split}: {len(empty)} image(s) have no caption, e.g. index '
                     f'{empty[0]}.')
  ids = np.asarray([meta[i]['image/id'] for i in range(len(meta))], np.int64)
  task_sources = {}
  if dataset == 'demo':
    qa = functools.partial(examples.qa_pairs, seed=b.builder_config.seed,
                           image_size=b.builder_config.image_size)
    task_sources['qa'] = lambda: [qa(int(i)) for i in ids]
  return Split(f'{dataset}/{split}', b.as_data_source(split=split), captions, ids,
               task_sources=task_sources)


def decode_image(path: str | io.BytesIO, draft: bool = False) -> np.ndarray:
  """An image file (or its bytes in a BytesIO) as uint8 RGB [H, W, 3] (preprocess.to_rgb:
  16-bit scaled to 8, transparency onto white). `draft` lets a JPEG decode at a reduced scale:
  every byte is still read, so a truncated file still fails, at a fraction of the cost (the
  check at load time)."""
  with PIL.Image.open(path) as im:
    if draft:
      im.draft('RGB', (64, 64))
    return np.asarray(preprocess.to_rgb(im))


class ImageFiles(Sequence):
  """Image files decoded on access to uint8 RGB [H, W, 3]; [i]['image'] like a TFDS source."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = self.paths[index]
    try:
      return {'image': decode_image(path)}
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
      raise RuntimeError(f'Image {path} (index {index}) decoded at load time but cannot be '
                         f'decoded now (changed since?): {type(e).__name__}: {e}. Fix or remove '
                         'the file and its captions.') from e


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Captions JSON {path} does not exist.')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'Captions JSON {path} is not valid JSON: {e}') from e


_LAYOUTS = ('expected COCO layout {"images": [{"id", "file_name"}], "annotations": '
            '[{"image_id", "caption"}]} or Karpathy layout {"images": [{"filename", "split", '
            '"sentences": [{"raw"}]}]}')


def _entries(data, path: str, split: str, restval_in_train: bool):
  """(relative file, image id, captions) of each image of `split`, in file order, and the
  number of orphan annotations; a malformed entry is an error naming it."""
  keys = sorted(data) if isinstance(data, dict) else type(data).__name__
  images = data.get('images') if isinstance(data, dict) else None
  if not isinstance(images, list):
    raise ValueError(f'Captions JSON {path} has an unknown layout (top level: {keys}); '
                     f'{_LAYOUTS}.')
  entries = _Entries(path)
  if 'annotations' in data:  # COCO: the whole file is the split
    return entries.coco(images, data['annotations'])
  if not images or all(isinstance(im, dict) and 'sentences' in im for im in images):  # Karpathy
    wanted = {split, 'restval'} if split == 'train' and restval_in_train else {split}
    return entries.karpathy(images, split, wanted), 0
  raise ValueError(f'Captions JSON {path} has an unknown layout (top level: {keys}, images '
                   f'without "sentences" and no "annotations"); {_LAYOUTS}.')


class _Entries:
  """Reads the entries of one captions JSON; every error names the file and the entry."""

  def __init__(self, path: str):
    self.path, self.ids = path, {}

  def field(self, entry, i, *names, kind=None, where='images'):
    for name in names:
      if isinstance(entry, dict) and name in entry:
        value = entry[name]
        if kind is not None and not isinstance(value, kind):
          raise ValueError(f'Captions JSON {self.path}: {where}[{i}] has {name}={value!r}; '
                           f'expected a {_kind_name(kind)}.')
        return value
    raise ValueError(f'Captions JSON {self.path}: {where}[{i}] has no '
                     f'{" or ".join(map(repr, names))} (its keys: '
                     f'{sorted(entry) if isinstance(entry, dict) else entry!r}).')

  def relative(self, i, *parts):
    """The file name joined to its folder, which it must not leave."""
    rel = os.path.join(*parts)
    norm = os.path.normpath(rel)
    if not parts[-1] or os.path.isabs(rel) or norm == '..' or norm.startswith('..' + os.sep):
      raise ValueError(f'Captions JSON {self.path}: images[{i}] has file name {rel!r}, which is '
                       'not a path inside the image folder.')
    return norm

  def unique(self, i, image_id):
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
      raise ValueError(f'Captions JSON {self.path}: images[{i}] has image id {image_id!r}; '
                       'expected an integer or a string.')
    if image_id in self.ids:
      raise ValueError(f'Captions JSON {self.path}: images[{i}] repeats image id {image_id!r} '
                       f'of images[{self.ids[image_id]}].')
    self.ids[image_id] = i

  def coco(self, images, annotations):
    if not isinstance(annotations, list):
      raise ValueError(f'Captions JSON {self.path}: "annotations" is a '
                       f'{type(annotations).__name__}, not a list; {_LAYOUTS}.')
    by_id = {}
    for i, im in enumerate(images):
      image_id = self.field(im, i, 'id')
      self.unique(i, image_id)
      by_id[image_id] = (self.relative(i, self.field(im, i, 'file_name', kind=str)), [])
    orphans = 0
    for j, a in enumerate(annotations):
      image_id = self.field(a, j, 'image_id', where='annotations')
      caption = self.field(a, j, 'caption', kind=str, where='annotations')
      if isinstance(image_id, (int, str)) and image_id in by_id:
        by_id[image_id][1].append(caption)
      else:
        orphans += 1
    if orphans:
      logging.warning('%s: %d annotation(s) name no image listed in "images"; skipped.',
                      self.path, orphans)
    return [(f, i, caps) for i, (f, caps) in by_id.items()], orphans

  def karpathy(self, images, split, wanted):
    out, found = [], set()
    for i, im in enumerate(images):
      image_id = im.get('cocoid', im.get('imgid', i))
      self.unique(i, image_id)  # over the whole file, every split
      s = self.field(im, i, 'split', kind=str)
      found.add(s)
      rel = self.relative(i, self.field(im, i, 'filepath', kind=str) if 'filepath' in im else '',
                          self.field(im, i, 'filename', kind=str))
      sentences = self.field(im, i, 'sentences', kind=list)
      if not sentences:
        raise ValueError(f'Captions JSON {self.path}: images[{i}] ({rel}) has an empty '
                         '"sentences" list.')
      caps = [_sentence(c, f'images[{i}] ({rel}) sentences[{k}]', self.path)
              for k, c in enumerate(sentences)]
      if s in wanted:
        out.append((rel, image_id, caps))
    if not out:
      raise ValueError(f'Captions JSON {self.path} (Karpathy layout) has no image in split '
                       f'{split!r}; its splits are {sorted(found)}.')
    return out


def _sentence(c, where: str, path: str) -> str:
  """A Karpathy sentence: a string, or {"raw": str} or {"tokens": [str, ...]}."""
  if isinstance(c, str):
    return c
  if isinstance(c, dict) and isinstance(c.get('raw'), str):
    return c['raw']
  if isinstance(c, dict) and 'raw' not in c and isinstance(c.get('tokens'), list) and all(
      isinstance(t, str) for t in c['tokens']):
    return ' '.join(c['tokens'])
  raise ValueError(f'Captions JSON {path}: {where} is {c!r}; expected a string or '
                   '{"raw": string} (or {"tokens": [string, ...]}).')


def _kind_name(kind) -> str:
  return {str: 'string', list: 'list'}.get(kind, getattr(kind, '__name__', str(kind)))


def _check_image(path: str) -> str | None:
  """None if `path` decodes in full to RGB, else why (a truncated JPEG fails here)."""
  if not os.path.isfile(path):
    return 'missing'
  try:
    decode_image(path, draft=True)
  except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
    return f'{type(e).__name__}: {e}'
  return None


def load_folder(captions_json: str, split: str, image_dir: str | None = None, *,
                restval_in_train: bool = False, workers: int = 8) -> Split:
  """A split of a user's own images and captions JSON (COCO or Karpathy layout).

  Karpathy entries are selected by their "split" field ("restval" joins "train" only when
  restval_in_train: the paper trains on the train split only); a COCO file is the split
  whatever its name. Malformed entries
  are errors (see `_entries`). Empty captions, images left without a caption, and missing or
  undecodable image files are skipped with a warning naming each file, and counted in
  `Split.skipped`. Every image is decoded once here (JPEGs at a reduced scale), so that a
  truncated file is skipped now rather than failing mid-epoch; decoding for use happens on
  access.
  """
  entries, orphans = _entries(_read_json(captions_json), captions_json, split, restval_in_train)
  image_dir = image_dir if image_dir is not None else os.path.dirname(captions_json)
  skipped = dict.fromkeys(SKIP_KINDS, 0)
  skipped['orphan_captions'] = orphans
  kept = []
  for rel, image_id, raw in entries:
    path = os.path.join(image_dir, rel)
    caps = [c.strip() for c in raw if isinstance(c, str) and c.strip()]
    if len(caps) < len(raw):
      skipped['empty_captions'] += len(raw) - len(caps)
      logging.warning('%s: %d empty caption(s) of image %s skipped.', captions_json,
                      len(raw) - len(caps), path)
    if not caps:
      skipped['uncaptioned_images'] += 1
      logging.warning('%s: image %s has no caption left; skipped.', captions_json, path)
      continue
    kept.append((path, image_id, caps))
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:  # file I/O bound
    problems = list(pool.map(_check_image, [p for p, _, _ in kept]))
  paths, ids, captions = [], [], []
  for (path, image_id, caps), problem in zip(kept, problems):
    if problem == 'missing':
      skipped['missing_images'] += 1
      logging.warning('%s: image file %s does not exist; skipped.', captions_json, path)
    elif problem:
      skipped['corrupt_images'] += 1
      logging.warning('%s: image file %s is not a readable image (%s); skipped.', captions_json,
                      path, problem)
    else:
      paths.append(path)
      ids.append(image_id)
      captions.append(caps)
  name = f'folder/{split}'
  if any(skipped.values()):
    logging.warning('%s (%s): skipped %s; %d image(s) kept.', name, captions_json,
                    ', '.join(f'{n} {k}' for k, n in skipped.items() if n), len(paths))
  if not paths:
    raise ValueError(f'{name} ({captions_json}): no usable image with a caption under '
                     f'{image_dir}; skipped {skipped}.')
  try:
    image_ids = np.asarray(ids, np.int64)
  except (TypeError, ValueError, OverflowError):  # non-integer ids: number images by position
    logging.warning('%s: image ids are not integers; using positions 0..%d instead.',
                    captions_json, len(ids) - 1)
    image_ids = np.arange(len(ids), dtype=np.int64)
  return Split(name, ImageFiles(paths), captions, image_ids, skipped)
