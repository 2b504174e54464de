"""The paper's attention heatmaps (section 4.5): where caption tokens look in the image.

For a span of caption positions, one layer's attention weights are kept on the rows of those
queries and the columns of the N image positions, summed over the queries and the heads, and
reshaped to the image-token grid (sqrt(N) x sqrt(N), row-major as the encoder's patches). Each
grid is scaled to its maximum, upscaled to the image, coloured and blended over it. A caption's
figure is one PNG sheet: the image, the whole caption span, then one panel per caption token
(a word under the demo's word-level tokenizer), each query being that token's own position.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
import PIL.Image
import PIL.ImageDraw

from cpeft_jax.contexts import Kind
from cpeft_jax.data import layout
from cpeft_jax.models.attention import INTERMEDIATES
from cpeft_jax.models.vlm import VisionLanguageModel

PANEL = 128  # smallest panel side in pixels; smaller images are upscaled by an integer factor
LABEL_H = 14  # pixels under each panel for its label
COLUMNS = 8  # tiles per row of a figure


def image_grid(probs_BHLL, query_mask_BL, image_mask_BL) -> np.ndarray:
  """Attention [B, G, G] of the query positions over the image positions (G = sqrt(N)).

  probs_BHLL: one layer's attention weights (queries x keys); summed over heads and over the
  queries where query_mask_BL is set, then the N image columns of each row, in order.
  """
  probs_BHLL = np.asarray(probs_BHLL, np.float32)
  query_mask_BL, image_mask_BL = np.asarray(query_mask_BL, bool), np.asarray(image_mask_BL, bool)
  counts = image_mask_BL.sum(1)
  N = int(counts[0]) if counts.size else 0
  G = math.isqrt(N)
  if np.any(counts != N) or G * G != N or N == 0:
    raise ValueError(f'Heatmaps need the same square number of image positions in every row '
                     f'(a G x G patch grid); got {sorted(set(counts.tolist()))}.')
  over_keys_BL = np.einsum('bhqk,bq->bk', probs_BHLL, query_mask_BL.astype(np.float32))
  return over_keys_BL[image_mask_BL].reshape(-1, G, G)


def attention_weights(model: VisionLanguageModel, variables, batch) -> np.ndarray:
  """Every layer's attention weights [layers, B, H, L, L] of a laid-out batch (no cache)."""
  return np.asarray(_attention_fn(model)(variables, batch['pixels'], batch['tokens'],
                                         batch['kinds'], batch['context_ids'],
                                         batch['attention_mask']))


@functools.lru_cache(maxsize=4)
def _attention_fn(model):
  @jax.jit
  def run(variables, *inputs):
    _, state = model.apply(variables, *inputs, mutable=[INTERMEDIATES])
    return state[INTERMEDIATES]['decoder']['layers']['attn']['attention_probs'][0]
  return run


def caption_grids(model: VisionLanguageModel, variables, pixels_BHWC, captions, *, layer: int,
                  num_image_tokens: int, seq_len: int, ids, boundary: bool, context_map):
  """For each caption (token ids without BOS/EOS): ([G, G] over the whole caption,
  [T, G, G] per token), from `layer` of a forward pass over the caption laid out as in training.
  """
  batch = layout.layout_captions(captions, num_image_tokens=num_image_tokens, seq_len=seq_len,
                                 bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad,
                                 boundary=boundary, context_map=context_map)
  batch['pixels'] = np.asarray(pixels_BHWC)
  probs = attention_weights(model, variables, batch)
  if not -probs.shape[0] <= layer < probs.shape[0]:
    raise ValueError(f'Heatmap layer {layer} does not exist: the decoder has {probs.shape[0]} '
                     f'layers (valid: {-probs.shape[0]}..{probs.shape[0] - 1}).')
  probs, text_BL, image_BL = probs[layer], batch['kinds'] == Kind.TEXT, batch['image_mask']
  out = []
  for b in range(len(captions)):
    positions = np.flatnonzero(text_BL[b])
    one_hot_TL = np.zeros((len(positions), text_BL.shape[1]), bool)
    one_hot_TL[np.arange(len(positions)), positions] = True
    whole = image_grid(probs[b:b + 1], text_BL[b:b + 1], image_BL[b:b + 1])[0]
    per_token = (image_grid(np.repeat(probs[b:b + 1], len(positions), 0), one_hot_TL,
                            np.repeat(image_BL[b:b + 1], len(positions), 0))
                 if len(positions) else np.zeros((0, *whole.shape), np.float32))
    out.append((whole, per_token))
  return out


def jet(x):
  """The 'jet' colour map: values in [0, 1] -> uint8 RGB (blue low, red high)."""
  x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)[..., None]
  rgb = np.clip(1.5 - np.abs(4.0 * x - np.asarray([3.0, 2.0, 1.0], np.float32)), 0.0, 1.0)
  return (255 * rgb).round().astype(np.uint8)


def overlay(image_HW3, grid_GG, *, alpha: float = 0.5) -> np.ndarray:
  """The grid, scaled to its maximum and upscaled (bilinear) to the image, blended over it."""
  image_HW3 = np.asarray(image_HW3, np.uint8)
  H, W, _ = image_HW3.shape
  grid_GG = np.asarray(grid_GG, np.float32)
  grid_GG = grid_GG / grid_GG.max() if grid_GG.max() > 0 else grid_GG
  heat_HW = np.asarray(PIL.Image.fromarray(grid_GG, mode='F').resize((W, H), PIL.Image.BILINEAR))
  out = (1 - alpha) * image_HW3.astype(np.float32) + alpha * jet(heat_HW).astype(np.float32)
  return out.round().astype(np.uint8)


def figure(image_HW3, panels: Sequence[tuple[str, np.ndarray]], *,
           columns: int = COLUMNS) -> PIL.Image.Image:
  """The image, then one overlay per (label, grid) panel, labels underneath, in rows of
  `columns` tiles."""
  image_HW3 = np.asarray(image_HW3, np.uint8)
  scale = max(1, -(-PANEL // max(image_HW3.shape[:2])))
  big = PIL.Image.fromarray(image_HW3).resize(
      (image_HW3.shape[1] * scale, image_HW3.shape[0] * scale), PIL.Image.BICUBIC)
  big_HW3 = np.asarray(big)
  H, W = big_HW3.shape[:2]
  tiles = [('image', big_HW3)] + [(label, overlay(big_HW3, g)) for label, g in panels]
  cols = min(columns, len(tiles))
  rows = -(-len(tiles) // cols)
  sheet = PIL.Image.new('RGB', (W * cols, (H + LABEL_H) * rows), 'white')
  draw = PIL.ImageDraw.Draw(sheet)
  for n, (label, tile) in enumerate(tiles):
    x, y = (n % cols) * W, (n // cols) * (H + LABEL_H)
    sheet.paste(PIL.Image.fromarray(tile), (x, y))
    draw.text((x + 2, y + H + 1), label[:W // 6], fill='black')
  return sheet


def write(path: str, image_HW3, panels: Sequence[tuple[str, np.ndarray]]) -> str:
  """Writes `figure(image_HW3, panels)` as a PNG at `path`; returns the path."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  figure(image_HW3, panels).save(path, format='PNG')
  return path
