"""Context presets, kind -> context id mapping, and the errors at that boundary."""

import numpy as np
import pytest

from cpeft_jax import contexts
from cpeft_jax.contexts import Kind

ALL_KINDS_BL = np.array([[Kind.BOS, Kind.BOUNDARY, Kind.IMAGE, Kind.IMAGE, Kind.BOUNDARY,
                          Kind.TEXT, Kind.TEXT, Kind.EOS, Kind.PAD]], np.int32)


def test_kinds_are_small_distinct_ints():
  assert [int(k) for k in Kind] == list(range(len(Kind)))
  assert contexts.KIND_NAMES == ('pad', 'bos', 'image', 'text', 'eos', 'boundary')


def test_agnostic_preset_is_all_zero():
  ctx_BL = contexts.context_ids(ALL_KINDS_BL, 'agnostic')
  assert ctx_BL.dtype == np.int32 and ctx_BL.shape == ALL_KINDS_BL.shape
  assert (ctx_BL == 0).all()
  assert contexts.num_contexts('agnostic') == 1


def test_modality_preset_puts_image_and_boundary_in_context_one():
  ctx_BL = contexts.context_ids(ALL_KINDS_BL, 'modality')
  np.testing.assert_array_equal(ctx_BL, [[0, 1, 1, 1, 1, 0, 0, 0, 0]])
  assert contexts.num_contexts('modality') == 2


def test_modality_preset_with_own_boundary_context():
  mapping = contexts.preset('modality', boundary=2)
  ctx_BL = contexts.context_ids(ALL_KINDS_BL, mapping)
  np.testing.assert_array_equal(ctx_BL, [[0, 2, 1, 1, 2, 0, 0, 0, 0]])
  assert contexts.num_contexts(mapping) == 3
  assert contexts.preset('modality', boundary=0)['boundary'] == 0


def test_custom_map_matches_slow_lookup():
  mapping = {'pad': 0, 'bos': 3, 'image': 1, Kind.TEXT: 2, 'eos': 2, 'boundary': 1}
  by_kind = {Kind.PAD: 0, Kind.BOS: 3, Kind.IMAGE: 1, Kind.TEXT: 2, Kind.EOS: 2, Kind.BOUNDARY: 1}
  kinds_BL = np.random.default_rng(0).integers(0, len(Kind), size=(4, 7))
  ctx_BL = contexts.context_ids(kinds_BL, mapping)
  for b in range(4):
    for t in range(7):
      assert ctx_BL[b, t] == by_kind[Kind(int(kinds_BL[b, t]))]
  assert contexts.num_contexts(mapping) == 4


def test_partial_map_is_fine_until_a_missing_kind_occurs():
  mapping = {'image': 1, 'text': 0}
  np.testing.assert_array_equal(
      contexts.context_ids(np.array([Kind.IMAGE, Kind.TEXT]), mapping), [1, 0])
  with pytest.raises(ValueError, match=r"no id for token kinds \['bos', 'pad'\]"):
    contexts.context_ids(np.array([Kind.BOS, Kind.IMAGE, Kind.PAD]), mapping)


def test_empty_kinds_array():
  assert contexts.context_ids(np.zeros((0, 5), np.int32), 'modality').shape == (0, 5)


@pytest.mark.parametrize('bad, match', [
    ('modal', r"unknown context preset 'modal'; expected one of \['agnostic', 'modality'\]"),
    ({'img': 1}, r"unknown token kind 'img' in context map; expected one of \['pad', 'bos'"),
    ({'image': -1}, r"context id for kind 'image' must be an int >= 0, got -1"),
    ({'image': 1.5}, r"context id for kind 'image' must be an int >= 0, got 1.5"),
    ({}, r'empty context map'),
])
def test_bad_maps_name_the_value(bad, match):
  with pytest.raises(ValueError, match=match):
    contexts.context_ids(ALL_KINDS_BL, bad)


def test_bad_kinds_are_named():
  with pytest.raises(ValueError, match=r'token kinds \[6, 9\] are not valid'):
    contexts.context_ids(np.array([0, 6, 9]), 'agnostic')
  with pytest.raises(ValueError, match=r'token kinds \[-1\] are not valid'):
    contexts.context_ids(np.array([-1, 2]), 'agnostic')
  with pytest.raises(ValueError, match=r'token kinds must be an integer array, got dtype float64'):
    contexts.context_ids(np.array([1.0, 2.0]), 'agnostic')


def test_agnostic_rejects_a_boundary_context():
  with pytest.raises(ValueError, match='boundary=1'):
    contexts.preset('agnostic', boundary=1)
