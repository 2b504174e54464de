"""Caption datasets as random-access splits: the offline demo and COCO, both through TFDS.

A `Split` gives an image by index (uint8 [H, W, 3]) and every image's reference captions,
read once with image decoding skipped. COCO uses TFDS's `coco_captions` (Karpathy splits:
train, val, test, restval), which must already be prepared in `data_dir` (preparing it needs
TensorFlow and the download); the demo builds itself on first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

DATASETS = ('demo', 'coco_captions')


@dataclasses.dataclass
class Split:
  name: str
  images: Sequence  # random access; [i]['image'] is uint8 [H, W, 3]
  captions: list[list[str]]  # reference captions of each image
  image_ids: np.ndarray

  def __len__(self) -> int:
    return len(self.captions)

  def image(self, index: int) -> np.ndarray:
    return np.asarray(self.images[index]['image'])


def _texts(example) -> list[str]:
  texts = example['captions']['text']
  return [t.decode() if isinstance(t, bytes) else str(t) for t in texts]


def load(dataset: str, split: str, data_dir: str | None = None, demo_config=None) -> Split:
  """Opens one split; errors name the dataset or split and list what exists."""
  if dataset == 'demo':
    from cpeft_jax.data.demo import builder
    b = builder.CpeftDemoCaptions(config=demo_config or builder.make_config(), data_dir=data_dir,
                                  file_format='array_record')
    b.download_and_prepare()
  elif dataset == 'coco_captions':
    try:
      b = tfds.builder('coco_captions', data_dir=data_dir, file_format='array_record')
    except Exception as e:  # noqa: BLE001 - TFDS raises many types here
      raise RuntimeError(f'Cannot open TFDS coco_captions in data_dir={data_dir!r}: {e}. '
                         'Prepare it once with TensorFlow installed '
                         '(tfds build coco_captions --file_format=array_record).') from e
  else:
    raise ValueError(f'Unknown dataset {dataset!r}; expected one of {DATASETS}.')
  if split not in b.info.splits:
    raise ValueError(f'Dataset {dataset!r} has no split {split!r}; it has '
                     f'{sorted(b.info.splits)}.')
  meta = b.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  captions = [_texts(meta[i]) for i in range(len(meta))]
  empty = [i for i, c in enumerate(captions) if not c]
  if empty:
    raise ValueError(f'{dataset}/{split}: {len(empty)} image(s) have no caption, e.g. index '
                     f'{empty[0]}.')
  ids = np.asarray([meta[i]['image/id'] for i in range(len(meta))], np.int64)
  return Split(f'{dataset}/{split}', b.as_data_source(split=split), captions, ids)
