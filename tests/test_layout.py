"""The [BOS] image caption [EOS] [PAD] layout against a slow per-position reference."""

import numpy as np
import pytest

from cpeft_jax.contexts import Kind
from cpeft_jax.data import layout

BOS, EOS, PAD = 1, 2, 0
OPEN, CLOSE = 7, 8
KEYS = ('tokens', 'targets', 'kinds', 'target_kinds', 'image_mask', 'attention_mask',
        'loss_mask', 'num_dropped')


def _lay(captions, n=4, length=12, **kw):
  return layout.layout_captions(captions, num_image_tokens=n, seq_len=length, bos_id=BOS,
                                eos_id=EOS, pad_id=PAD, **kw)


def _slow(caption, n, length, boundary=False, boundary_ids=None, prompt=()):
  """Builds one row position by position: a list of (token, kind), then shifts by one."""
  open_id, close_id = boundary_ids or (PAD, PAD)
  seq = [(BOS, Kind.BOS)]
  if boundary:
    seq.append((open_id, Kind.BOUNDARY))
  seq += [(PAD, Kind.IMAGE)] * n
  if boundary:
    seq.append((close_id, Kind.BOUNDARY))
  seq += [(tok, Kind.PROMPT) for tok in prompt]  # context only: never a loss target
  caption = list(caption)
  dropped = 0
  while len(seq) + len(caption) + 1 > length + 1:  # the EOS may sit in slot L (a target only)
    caption.pop()
    dropped += 1
  seq += [(tok, Kind.TEXT) for tok in caption] + [(EOS, Kind.EOS)]
  seq += [(PAD, Kind.PAD)] * (length + 1 - len(seq))
  row = {'tokens': [], 'targets': [], 'kinds': [], 'target_kinds': [], 'loss_mask': []}
  for t in range(length):
    row['tokens'].append(seq[t][0])
    row['kinds'].append(seq[t][1])
    row['targets'].append(seq[t + 1][0])
    row['target_kinds'].append(seq[t + 1][1])
    row['loss_mask'].append(1.0 if seq[t + 1][1] in (Kind.TEXT, Kind.EOS) else 0.0)
  row['image_mask'] = [k == Kind.IMAGE for k in row['kinds']]
  row['attention_mask'] = [k != Kind.PAD for k in row['kinds']]
  row['num_dropped'] = dropped
  return row


def test_shapes_and_dtypes():
  batch = _lay([[5, 6], [], [9] * 20])
  assert set(batch) == set(KEYS)
  for key in KEYS[:-1]:
    assert batch[key].shape == (3, 12), key
  assert batch['num_dropped'].shape == (3,)
  dtypes = {'tokens': np.int32, 'targets': np.int32, 'kinds': np.int32, 'loss_mask': np.float32,
            'image_mask': np.bool_, 'attention_mask': np.bool_, 'num_dropped': np.int32}
  for key, dtype in dtypes.items():
    assert batch[key].dtype == dtype, key


@pytest.mark.parametrize('boundary, boundary_ids',
                         [(False, None), (True, None), (True, (OPEN, CLOSE))])
def test_matches_slow_reference(boundary, boundary_ids):
  rng = np.random.default_rng(0)
  n, length = 5, 16
  captions = [rng.integers(10, 50, size=k).tolist() for k in (0, 1, 3, 8, 9, 10, 11, 30)]
  batch = _lay(captions, n, length, boundary=boundary, boundary_ids=boundary_ids)
  for row, caption in enumerate(captions):
    ref = _slow(caption, n, length, boundary, boundary_ids)
    for key, value in ref.items():
      np.testing.assert_array_equal(batch[key][row], value, err_msg=f'{key} row {row}')


@pytest.mark.parametrize('boundary', [False, True])
def test_prompts_match_slow_reference(boundary):
  """A prompt sits between the image and the caption; the loss covers caption + EOS only, and
  truncation cuts the caption, never the prompt."""
  rng = np.random.default_rng(1)
  n, length = 3, 16
  sizes = [(0, 4), (3, 0), (2, 5), (4, 7), (5, 9), (9, 1), (1, 20)]  # (prompt, caption) lengths
  prompts = [rng.integers(10, 50, size=p).tolist() for p, _ in sizes]
  captions = [rng.integers(50, 90, size=c).tolist() for _, c in sizes]
  batch = _lay(captions, n, length, boundary=boundary, prompts=prompts)
  for row, (prompt, caption) in enumerate(zip(prompts, captions)):
    ref = _slow(caption, n, length, boundary, prompt=prompt)
    for key, value in ref.items():
      np.testing.assert_array_equal(batch[key][row], value, err_msg=f'{key} row {row}')
    # Independently: the masked targets are exactly the kept caption tokens, then the EOS.
    kept = caption[:length - 1 - n - 2 * boundary - len(prompt)]
    np.testing.assert_array_equal(batch['targets'][row][batch['loss_mask'][row] > 0],
                                  kept + [EOS])
  empty = _lay(captions, n, length, boundary=boundary, prompts=[[]] * len(captions))
  plain = _lay(captions, n, length, boundary=boundary)
  for key in KEYS:  # empty prompts are the captioning layout
    np.testing.assert_array_equal(empty[key], plain[key], err_msg=key)


def test_prompt_errors_name_the_row():
  with pytest.raises(ValueError, match=r'prompt 1 has 7 tokens; a row of seq_len=12 with 4 image '
                                       r'tokens holds at most 6 prompt tokens'):
    _lay([[5], [6]], prompts=[[9], [9] * 7])
  with pytest.raises(ValueError, match=r'prompt 0 contains eos_id=2 at position 1'):
    _lay([[5]], prompts=[[9, EOS]])
  with pytest.raises(ValueError, match=r'1 prompts for 2 captions'):
    _lay([[5], [6]], prompts=[[9]])


def test_loss_positions_predict_each_caption_token_then_eos():
  caption = [11, 12, 13]
  n = 4
  batch = _lay([caption], n, 12)
  loss_positions = np.flatnonzero(batch['loss_mask'][0]).tolist()
  # BOS at 0, images at 1..4: the last image position (4) predicts the first caption token.
  assert loss_positions == [4, 5, 6, 7]
  assert batch['targets'][0, loss_positions].tolist() == caption + [EOS]
  assert batch['tokens'][0, 5:8].tolist() == caption
  assert batch['image_mask'][0].tolist() == [False] + [True] * n + [False] * 7
  assert (batch['tokens'][0, 1:1 + n] == PAD).all()


def test_paper_layout_loss_covers_the_last_64_positions():
  assert layout.caption_budget(64, 128) == 63
  batch = _lay([list(range(100, 163)), list(range(100, 164))], 64, 128)
  np.testing.assert_array_equal(batch['loss_mask'][0], [0.0] * 64 + [1.0] * 64)
  assert batch['targets'][0, -1] == EOS and batch['attention_mask'][0].all()
  assert batch['num_dropped'].tolist() == [0, 1]
  np.testing.assert_array_equal(batch['tokens'][0], batch['tokens'][1])


def test_truncation_keeps_eos_and_counts():
  budget = layout.caption_budget(4, 12)
  assert budget == 7
  captions = [[20] * (budget - 1), [21] * budget, [22] * (budget + 1), [23] * (budget + 5)]
  batch = _lay(captions, 4, 12)
  assert batch['num_dropped'].tolist() == [0, 0, 1, 5]
  assert layout.truncation(batch) == (2, 6)
  for row in range(4):
    eos_at = np.flatnonzero(batch['targets'][row] == EOS)
    assert eos_at.size == 1 and batch['loss_mask'][row, eos_at[0]] == 1.0
    assert batch['loss_mask'][row].sum() == min(len(captions[row]), budget) + 1


def test_attention_mask_false_exactly_on_pad():
  batch = _lay([[5], [5, 6, 7]], 2, 10)
  np.testing.assert_array_equal(batch['attention_mask'], batch['kinds'] != Kind.PAD)
  assert batch['attention_mask'][0].tolist() == [True] * 5 + [False] * 5  # BOS, 2 img, 5, EOS


def test_context_ids_from_preset():
  batch = _lay([[5, 6]], 2, 8, boundary=True, context_map='modality')
  assert batch['context_ids'].tolist() == [[0, 1, 1, 1, 1, 0, 0, 0]]


def test_numpy_captions_and_empty_batch():
  batch = _lay([np.array([5, 6], np.int64)])
  assert batch['tokens'][0, 5:7].tolist() == [5, 6]
  empty = _lay([])
  assert empty['tokens'].shape == (0, 12) and layout.truncation(empty) == (0, 0)


@pytest.mark.parametrize('kwargs, match', [
    (dict(n=10, length=11),
     r'seq_len=11 is too small for num_image_tokens=10: expected seq_len >= 12'),
    (dict(n=10, length=13, boundary=True),
     r'seq_len=13 is too small for num_image_tokens=10 with boundary tokens: '
     r'expected seq_len >= 14'),
    (dict(n=-1), r'num_image_tokens must be >= 0, got -1'),
    (dict(boundary_ids=(7, 8)), r'boundary_ids=\(7, 8\) given but boundary=False'),
    (dict(boundary=True, boundary_ids=(7,)), r'boundary_ids must be \(open_id, close_id\)'),
    (dict(boundary=True, boundary_ids=(7, -8)), r'boundary_ids must be a token id .* got -8'),
])
def test_size_errors_name_the_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _lay([[5]], **kwargs)


def test_min_length_fits_one_caption_token():
  batch = _lay([[5, 6]], 10, 12)
  assert batch['num_dropped'].tolist() == [1]
  assert batch['targets'][0, -2:].tolist() == [5, EOS]


@pytest.mark.parametrize('captions, match', [
    ([[5], [6, EOS, 7]], r'caption 1 contains eos_id=2 at position 1; tokenize captions without'),
    ([[BOS, 5]], r'caption 0 contains bos_id=1 at position 0'),
    ([[5, -3]], r'caption 0 has negative token id -3'),
    ([[[5, 6]]], r'caption 0 must be a 1-D sequence of token ids'),
    ([[5.0, 6.0]], r'caption 0 must be a 1-D sequence of token ids'),
])
def test_caption_errors_name_the_caption(captions, match):
  with pytest.raises(ValueError, match=match):
    _lay(captions)


def test_bad_special_id():
  with pytest.raises(ValueError, match=r"eos_id must be a token id \(int >= 0\), got None"):
    layout.layout_captions([[5]], num_image_tokens=2, seq_len=8, bos_id=1, eos_id=None, pad_id=0)
