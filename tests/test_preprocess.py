"""Image preprocessing against transformers' PIL image processors on odd-sized random images."""

import json

import numpy as np
import pytest
from PIL import Image

from cpeft_jax.data import preprocess
from cpeft_jax.data.preprocess import ImageProcessing

# preprocessor_config.json as checkpoints write them (Swin V2's is the paper encoder's: a legacy
# ViT feature extractor with an int size).
CONFIGS = {
    'clip': {'image_processor_type': 'CLIPImageProcessor', 'size': {'shortest_edge': 24},
             'crop_size': {'height': 24, 'width': 24}},
    'clip_pad': {'image_processor_type': 'CLIPImageProcessorFast', 'size': 20, 'crop_size': 24,
                 'resample': 2},
    'siglip': {'image_processor_type': 'SiglipImageProcessor', 'size': {'height': 32, 'width': 32},
               'resample': 2},
    'swinv2': {'feature_extractor_type': 'ViTFeatureExtractor', 'size': 32, 'resample': 3,
               'do_resize': True, 'do_normalize': True, 'image_mean': [0.485, 0.456, 0.406],
               'image_std': [0.229, 0.224, 0.225]},
}
MAX_ABS_DIFF = 1e-6  # measured: 0 (bit-identical) with transformers 5.24, Pillow here


def _images():
  rng = np.random.default_rng(0)
  shapes = [(37, 53, 'RGB'), (61, 29, 'RGB'), (40, 40, 'RGBA'), (19, 45, 'L')]
  out = []
  for h, w, mode in shapes:
    channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
    x = rng.integers(0, 256, (h, w, channels), np.uint8)
    out.append(Image.fromarray(x[..., 0] if channels == 1 else x, mode))
  return out


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_matches_transformers_image_processor(name, tmp_path):
  transformers = pytest.importorskip('transformers')
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps(CONFIGS[name]))
  reference = transformers.AutoImageProcessor.from_pretrained(tmp_path)
  ours = ImageProcessing.from_pretrained(tmp_path)
  for image in _images():
    if image.mode != 'RGB' and not reference.do_convert_rgb:
      continue  # ViT's processor does not convert (it fails on RGBA and L); ours always does
    want = reference(image, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
    got = ours(image)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=MAX_ABS_DIFF)


def test_parameters_read_from_config():
  p = ImageProcessing.from_hf(CONFIGS['swinv2'])
  assert p.size == (32, 32) and p.shortest_edge is None and p.resample == 3
  assert not p.do_center_crop and p.image_mean == (0.485, 0.456, 0.406)
  c = ImageProcessing.from_hf(CONFIGS['clip'])
  assert c.shortest_edge == 24 and c.crop_size == (24, 24) and c.output_size == (24, 24)
  assert c.image_mean == preprocess.OPENAI_CLIP_MEAN
  assert c.resize_shape(37, 53) == (24, 34) and c.resize_shape(61, 29) == (50, 24)


def test_batch_is_channels_last_float32():
  p = ImageProcessing.from_hf(CONFIGS['siglip'])
  x = p.batch(_images() + [np.zeros((5, 7, 3), np.uint8)])
  assert x.shape == (5, 32, 32, 3) and x.dtype == np.float32


def test_errors():
  with pytest.raises(ValueError, match='supported: CLIPImageProcessor'):
    ImageProcessing.from_hf({'image_processor_type': 'DetrImageProcessor'})
  with pytest.raises(ValueError, match='size='):
    ImageProcessing.from_hf({'image_processor_type': 'CLIPImageProcessor',
                             'size': {'longest_edge': 5}})
  with pytest.raises(ValueError, match='different shapes'):
    ImageProcessing(size=None, shortest_edge=8).batch(_images())
  with pytest.raises(ValueError, match='uint8'):
    ImageProcessing()(np.zeros((4, 4, 3), np.float32))
