"""Images -> the pixel arrays a vision checkpoint expects, as its preprocessor_config.json says.

Pure numpy + PIL. The steps and their arithmetic are those of transformers' PIL image
processors (CLIPImageProcessor, SiglipImageProcessor, ViTImageProcessor; Swin V2 checkpoints
name ViT's), so the arrays match theirs:

  RGB      transparency composited onto white; 16-bit greyscale ('I;16', 'I') to 8 bits by its
           high byte (as PIL reads 16-bit RGB); any other mode converted by PIL
  resize   PIL, with the checkpoint's filter, on the 8-bit image: to a fixed (height, width), or
           the shortest edge to n and the other to int(n * long / short)
  crop     a center crop (offsets floor((size - crop) / 2)), zero-padded where the image is
           smaller
  rescale  float64 multiply by rescale_factor, then float32
  normalize  (x - mean) / std in float32

Output is channels-last float32 [H, W, 3], the encoders' input layout. Images are always
converted to RGB (transformers does so too unless a config turns it off, when it would fail on
non-RGB images anyway).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

PREPROCESSOR_CONFIG = 'preprocessor_config.json'
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN and _STD

# transformers' class defaults, for keys a preprocessor_config.json may omit. square: whether
# an int size means (n, n) (else the shortest edge), as the class's default_to_square.
PROCESSORS = {
    'CLIPImageProcessor': dict(
        square=False, do_resize=True, size={'shortest_edge': 224}, resample=3,
        do_center_crop=True, crop_size={'height': 224, 'width': 224}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD),
    'SiglipImageProcessor': dict(
        square=False, do_resize=True, size={'height': 224, 'width': 224}, resample=3,
        do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=HALF, image_std=HALF),
    'ViTImageProcessor': dict(
        square=True, do_resize=True, size={'height': 224, 'width': 224}, resample=2,
        do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=HALF, image_std=HALF),
}
_RESAMPLE = {0: 'NEAREST', 1: 'LANCZOS', 2: 'BILINEAR', 3: 'BICUBIC', 4: 'BOX', 5: 'HAMMING'}


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """One checkpoint's resize / crop / rescale / normalize parameters.

  Resizing goes to `size` (height, width) when given, else the shortest edge to `shortest_edge`.
  """
  do_resize: bool = True
  size: tuple[int, int] | None = (224, 224)
  shortest_edge: int | None = None
  resample: int = 3  # a PIL filter number: 2 bilinear, 3 bicubic
  do_center_crop: bool = False
  crop_size: tuple[int, int] | None = None
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = HALF
  image_std: tuple[float, float, float] = HALF

  def __post_init__(self):
    if self.do_resize and (self.size is None) == (self.shortest_edge is None):
      raise ValueError(f'preprocess: resizing needs exactly one of size={self.size} and '
                       f'shortest_edge={self.shortest_edge}.')
    if self.do_center_crop and self.crop_size is None:
      raise ValueError('preprocess: do_center_crop is set but crop_size is not.')
    if self.resample not in _RESAMPLE:
      raise ValueError(f'preprocess.resample={self.resample!r}; expected a PIL filter number in '
                       f'{_RESAMPLE}.')
    for name in ('image_mean', 'image_std'):
      if len(getattr(self, name)) != 3:
        raise ValueError(f'preprocess.{name}={getattr(self, name)}; expected 3 values (RGB).')
    if not all(s > 0 for s in self.image_std):
      raise ValueError(f'preprocess.image_std={self.image_std} must be positive.')

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> ImageProcessing:
    """From a preprocessor_config.json dict, with its processor class's defaults."""
    kind = processor_type(d)
    defaults = PROCESSORS[kind]
    get = lambda key: d[key] if d.get(key) is not None else defaults[key]
    size = _size_dict(get('size'), defaults['square'], 'size')
    crop = get('crop_size')
    crop = _size_dict(crop, True, 'crop_size') if crop is not None else None
    if set(size) == {'shortest_edge'}:
      fixed, shortest = None, size['shortest_edge']
    elif set(size) == {'height', 'width'}:
      fixed, shortest = (size['height'], size['width']), None
    else:
      raise ValueError(f'{PREPROCESSOR_CONFIG} has size={get("size")}; supported: '
                       "{'height', 'width'} or {'shortest_edge'}.")
    if crop is not None and set(crop) != {'height', 'width'}:
      raise ValueError(f"{PREPROCESSOR_CONFIG} has crop_size={crop}; expected 'height' and "
                       "'width'.")
    return cls(
        do_resize=bool(get('do_resize')), size=fixed, shortest_edge=shortest,
        resample=int(get('resample')), do_center_crop=bool(get('do_center_crop')),
        crop_size=(crop['height'], crop['width']) if crop else None,
        do_rescale=bool(get('do_rescale')), rescale_factor=float(get('rescale_factor')),
        do_normalize=bool(get('do_normalize')), image_mean=_triple(get('image_mean')),
        image_std=_triple(get('image_std')))

  @classmethod
  def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessing:
    """From a checkpoint directory's preprocessor_config.json."""
    path = pathlib.Path(directory) / PREPROCESSOR_CONFIG
    if not path.is_file():
      raise FileNotFoundError(f'No {PREPROCESSOR_CONFIG} in checkpoint directory {directory}.')
    return cls.from_hf(json.loads(path.read_text()))

  @property
  def output_size(self) -> tuple[int, int] | None:
    """(height, width) of every output, or None where it follows each image's aspect ratio."""
    if self.do_center_crop:
      return self.crop_size
    if self.do_resize and self.size is not None:
      return self.size
    return None

  def resize_shape(self, height: int, width: int) -> tuple[int, int]:
    """The (height, width) an image is resized to."""
    if self.size is not None:
      return self.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)

  def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
    """One image (PIL, or a uint8 [H, W] / [H, W, 3|4] array) -> float32 [H', W', 3]."""
    image = to_rgb(image)
    if self.do_resize:
      h, w = self.resize_shape(image.height, image.width)
      image = image.resize((w, h), resample=Image.Resampling[_RESAMPLE[self.resample]])
    x = np.asarray(image)
    if self.do_center_crop:
      x = center_crop(x, self.crop_size)
    if self.do_rescale:
      x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
    x = x.astype(np.float32)
    if self.do_normalize:
      x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return x

  def batch(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    """Images -> float32 [B, H, W, 3]; they must come out the same size (a fixed size or crop)."""
    out = [self(im) for im in images]
    shapes = sorted({x.shape for x in out})
    if len(shapes) > 1:
      raise ValueError(f'Images came out in different shapes {shapes}; batching needs a fixed '
                       'size or a center crop.')
    return np.stack(out)


def processor_type(d: Mapping[str, Any]) -> str:
  """The image processor class a preprocessor_config.json names, without Fast/Pil suffixes."""
  name = d.get('image_processor_type') or d.get('feature_extractor_type')
  base = name
  if isinstance(base, str):
    base = base.replace('FeatureExtractor', 'ImageProcessor')
    for suffix in ('Fast', 'Pil'):
      base = base.removesuffix(suffix)
  if base not in PROCESSORS:
    raise ValueError(f'{PREPROCESSOR_CONFIG} names image processor {name!r}; supported: '
                     f'{", ".join(PROCESSORS)} (and their Fast/Pil variants).')
  return base


# 16-bit greyscale as PIL opens it (PNG, TIFF); 'I' (32-bit) holds such data too. PIL's own
# convert clips them at 255, which turns most of an image white.
SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  """RGB, with any transparency composited onto white (as transformers' convert_to_rgb);
  16-bit greyscale is scaled to 8 bits (its high byte) first."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f'Array images must be uint8 [H, W] or [H, W, C], got {image.dtype} '
                       f'{image.shape}.')
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise TypeError(f'Expected a PIL image or a uint8 array, got {type(image).__name__}.')
  if image.mode in SIXTEEN_BIT:
    x = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
    image = Image.fromarray(x.astype(np.uint8), 'L')
  if 'A' in image.getbands() or image.info.get('transparency') is not None:
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  return image.convert('RGB')


def center_crop(x_HWC: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A center crop to (height, width); where the image is smaller it is zero-padded first."""
  h, w = x_HWC.shape[:2]
  ch, cw = size
  top, left = (h - ch) // 2, (w - cw) // 2
  if top >= 0 and left >= 0:
    return x_HWC[top:top + ch, left:left + cw]
  ph, pw = max(ch, h), max(cw, w)
  pad_top, pad_left = -(-(ph - h) // 2), -(-(pw - w) // 2)  # ceil, as transformers
  padded = np.zeros((ph, pw) + x_HWC.shape[2:], x_HWC.dtype)
  padded[pad_top:pad_top + h, pad_left:pad_left + w] = x_HWC
  top, left = top + pad_top, left + pad_left
  return padded[max(0, top):min(ph, top + ch), max(0, left):min(pw, left + cw)]


def _size_dict(value, square: bool, name: str) -> dict[str, int]:
  """transformers' get_size_dict: an int is (n, n) or the shortest edge; a pair is (h, w)."""
  if isinstance(value, Mapping):
    return {k: v for k, v in value.items() if v is not None}
  if isinstance(value, int):
    return {'height': value, 'width': value} if square else {'shortest_edge': value}
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return {'height': value[0], 'width': value[1]}
  raise ValueError(f'{PREPROCESSOR_CONFIG} has {name}={value!r}; expected an int, a '
                   '[height, width] pair or a dict.')


def _triple(value) -> tuple[float, float, float]:
  if isinstance(value, (int, float)):
    return (float(value),) * 3
  return tuple(float(v) for v in value)
