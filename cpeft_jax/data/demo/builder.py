"""The demo dataset as a TFDS builder, with coco_captions' features, readable without TensorFlow.

Images are stored PNG-encoded by `encode_png` (Pillow), because TFDS encodes numpy images
with TensorFlow. Building needs no TensorFlow and no download; reading with
`as_data_source` decodes PNGs with Pillow (or OpenCV), as it does COCO's JPEGs.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from cpeft_jax.data.demo import examples

_CONFIG_VALUES = ('image_size', 'num_train', 'num_validation', 'num_test',
                  'captions_per_image', 'seed')
_CONFIGS: dict[str, 'DemoConfig'] = {}


@dataclasses.dataclass(eq=False)
class DemoConfig(tfds.core.BuilderConfig):
  """Scene resolution, split sizes, captions per image and seed of one stored variant."""
  image_size: int = 64
  num_train: int = 5000
  num_validation: int = 500
  num_test: int = 500
  captions_per_image: int = 5
  seed: int = 0

  def split_sizes(self) -> dict[str, int]:
    return {'train': self.num_train, 'validation': self.num_validation, 'test': self.num_test}


def make_config(**overrides) -> DemoConfig:
  """A config named after its values, so different variants never share a data directory.

  Equal values give the same instance (TFDS rejects a second object named like a class config).
  """
  values = {f.name: f.default for f in dataclasses.fields(DemoConfig)
            if f.name in _CONFIG_VALUES} | overrides
  unknown = set(values) - set(_CONFIG_VALUES)
  if unknown:
    raise ValueError(f'unknown demo config fields {sorted(unknown)}; '
                     f'expected {list(_CONFIG_VALUES)}')
  name = ('s{image_size}_n{num_train}-{num_validation}-{num_test}'
          '_c{captions_per_image}_seed{seed}').format(**values)
  if name not in _CONFIGS:
    _CONFIGS[name] = DemoConfig(name=name, **values)
  return _CONFIGS[name]


class CpeftDemoCaptions(tfds.core.GeneratorBasedBuilder):
  """Procedural shape scenes with five true templated captions each (coco_captions' features)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [make_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
            'image/filename': tfds.features.Text(),
            'image/id': np.int64,
            'captions': tfds.features.Sequence({'text': np.str_, 'id': np.int64}),
        }),
        # Stored in generation order: record i of a split is example i of `generate_examples`.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes().items()}

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    for example in examples.generate_examples(
        split, num_examples, seed=config.seed, image_size=config.image_size,
        captions_per_image=config.captions_per_image):
      yield example['image/id'], dict(example, image=encode_png(example['image']))


def data_source(split: str, data_dir: str, config: DemoConfig | None = None, **kwargs):
  """Builds the dataset into `data_dir` if needed and returns a random-access source of a split."""
  builder = CpeftDemoCaptions(config=config or make_config(), data_dir=data_dir,
                              file_format='array_record')
  builder.download_and_prepare()
  return builder.as_data_source(split=split, **kwargs)


def encode_png(image_HW3: np.ndarray) -> bytes:
  """Encodes a uint8 RGB image as PNG bytes (TFDS would need TensorFlow to encode numpy)."""
  image_HW3 = np.asarray(image_HW3)
  if image_HW3.dtype != np.uint8 or image_HW3.ndim != 3 or image_HW3.shape[-1] != 3:
    raise ValueError(f'expected a uint8 [H, W, 3] image, got {image_HW3.dtype} {image_HW3.shape}')
  buf = io.BytesIO()
  PIL.Image.fromarray(image_HW3).save(buf, format='PNG')
  return buf.getvalue()
