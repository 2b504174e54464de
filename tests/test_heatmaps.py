"""Attention heatmaps: the grid against a per-position loop, a hand-built attention pattern, the
model's sown weights, and a PNG whose colours sit where the attention is."""

import jax
import numpy as np
import PIL.Image
import pytest

from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.contexts import Kind
from cpeft_jax.data import layout
from cpeft_jax.data.tokenizer import SpecialIds
from cpeft_jax.evaluation import heatmaps
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.vlm import VisionLanguageModel
from helpers import PatchEncoder  # the shared stand-in encoder: 8x8 patches

IDS = SpecialIds(bos=1, eos=2, pad=0)


def _layout(captions, N, boundary):
  return layout.layout_captions(captions, num_image_tokens=N, seq_len=N + 10, bos_id=IDS.bos,
                                eos_id=IDS.eos, pad_id=IDS.pad, boundary=boundary,
                                context_map='modality')


def test_grid_equals_a_loop_over_positions():
  b = _layout([[5, 6, 7], [8, 9, 10, 11, 12]], N=16, boundary=True)  # boundaries are not image
  B, L = b['kinds'].shape
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(L), size=(B, 3, L)).astype(np.float32)
  queries = rng.random((B, L)) < 0.3
  ref = np.zeros((B, 4, 4), np.float32)
  for row in range(B):
    image_positions = [p for p in range(L) if b['kinds'][row, p] == Kind.IMAGE]
    for n, p in enumerate(image_positions):
      ref[row, n // 4, n % 4] = sum(probs[row, h, q, p] for h in range(3) for q in range(L)
                                    if queries[row, q])
  grid = heatmaps.image_grid(probs, queries, b['image_mask'])
  assert grid.shape == (B, 4, 4)
  np.testing.assert_allclose(grid, ref, rtol=1e-5)
  # Hand-built: every head of the caption's first query looks only at image token (1, 2).
  one_hot = np.zeros_like(probs)
  first_text = int(np.flatnonzero(b['kinds'][0] == Kind.TEXT)[0])
  one_hot[0, :, first_text, np.flatnonzero(b['image_mask'][0])[1 * 4 + 2]] = 1.0
  expected = np.zeros((4, 4), np.float32)
  expected[1, 2] = 3.0  # three heads
  np.testing.assert_array_equal(
      heatmaps.image_grid(one_hot, b['kinds'] == Kind.TEXT, b['image_mask'])[0], expected)


@pytest.mark.parametrize('image_mask, match', [
    (np.ones((1, 5), bool), r'square number of image positions.*\[5\]'),
    (np.asarray([[1, 1, 1, 1], [1, 0, 0, 0]], bool), r'in every row.*\[1, 4\]'),
])
def test_grid_needs_square_image_grid(image_mask, match):
  B, L = image_mask.shape
  with pytest.raises(ValueError, match=match):
    heatmaps.image_grid(np.zeros((B, 1, L, L)), np.ones((B, L), bool), image_mask)


def test_caption_grids_from_the_models_attention():
  dec = DecoderConfig(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2,
                      intermediate_size=24)
  model = VisionLanguageModel(PatchEncoder(), dec, PeftConfig(
      methods=('lora',), num_contexts=2, lora=LoraConfig(rank=2, alpha=2.0)))
  captions = [[5, 6, 7], [8, 9]]
  b = _layout(captions, N=4, boundary=False)
  b['pixels'] = np.asarray(jax.random.uniform(jax.random.key(1), (2, 16, 16, 3)))
  v = jax.jit(model.init)(jax.random.key(0), b['pixels'], b['tokens'], b['kinds'],
                          b['context_ids'])
  probs = heatmaps.attention_weights(model, v, b)
  assert probs.shape == (2, 2, 2, 14, 14)  # layers, B, H, L, L
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  out = heatmaps.caption_grids(model, v, b['pixels'], captions, layer=-1, num_image_tokens=4,
                               seq_len=14, ids=IDS, boundary=False, context_map='modality')
  for row, (whole, per_token) in enumerate(out):
    assert whole.shape == (2, 2) and per_token.shape == (len(captions[row]), 2, 2)
    for t in range(len(captions[row])):  # caption token t sits at 1 + 4 + t
      ref = probs[1, row, :, 5 + t, 1:5].sum(0).reshape(2, 2)
      np.testing.assert_allclose(per_token[t], ref, rtol=1e-5)
    np.testing.assert_allclose(whole, per_token.sum(0), rtol=1e-5)
  with pytest.raises(ValueError, match='Heatmap layer 2 does not exist: the decoder has 2'):
    heatmaps.caption_grids(model, v, b['pixels'], captions, layer=2, num_image_tokens=4,
                           seq_len=14, ids=IDS, boundary=False, context_map='modality')


def test_png_is_written_with_heat_where_the_attention_is(tmp_path):
  image = np.full((16, 16, 3), 128, np.uint8)
  top_left = np.zeros((4, 4), np.float32)
  top_left[0, 0] = 2.0
  path = heatmaps.write(str(tmp_path / 'maps' / 'x.png'), image,
                        [('caption', top_left), ('word', top_left.T[::-1, ::-1])])
  with PIL.Image.open(path) as f:
    assert f.format == 'PNG'
    png = np.asarray(f.convert('RGB')).astype(int)
  side = heatmaps.PANEL  # 16 px upscaled 8x
  assert png.shape == (side + heatmaps.LABEL_H, 3 * side, 3)
  np.testing.assert_array_equal(png[:side, :side], 128)  # the image itself
  panel = png[:side, side:2 * side]
  assert panel[2, 2, 0] > panel[2, 2, 2] + 30  # hot (red) at the top left
  assert panel[-3, -3, 2] > panel[-3, -3, 0] + 30  # cold (blue) at the bottom right
  mirrored = png[:side, 2 * side:]
  assert mirrored[-3, -3, 0] > mirrored[-3, -3, 2] + 30
