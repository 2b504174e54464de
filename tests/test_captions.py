"""captions.score equals pycocoevalcap's own COCOEvalCap on a small fixed set; bad input errors."""

import pytest
from pycocoevalcap import eval as coco_eval
from pycocotools.coco import COCO

from cpeft_jax.evaluation import captions

REFS = {
    7: ['A red circle above a blue square.', 'a red circle is on top of a blue square',
        'Red circle, blue square below it.'],
    11: ['two green triangles on the left', 'Two small green triangles at the left side.'],
    3: ['a yellow star in the middle of the image'],
    42: ['a blue square to the right of a red circle', 'A square (blue) right of a circle.'],
}
CANDS = {7: 'a red circle above a blue square', 11: 'two green triangle on the right',
         3: 'a star', 42: ''}  # an empty caption (EOS first) is scored, as zero


class _NoSpice:
  """Stands in for SPICE in the reference, whose constructor downloads CoreNLP."""

  def compute_score(self, gts, res):
    return 0.0, [0.0] * len(gts)

  def method(self):
    return 'SPICE'


def test_equals_coco_eval_cap(monkeypatch):
  coco = COCO()
  coco.dataset = {'images': [{'id': k} for k in REFS],
                  'annotations': [{'id': n, 'image_id': k, 'caption': c} for n, (k, c) in
                                  enumerate((k, c) for k, refs in REFS.items() for c in refs)]}
  coco.createIndex()
  res = coco.loadRes([{'image_id': k, 'caption': c} for k, c in CANDS.items()])
  with captions.Scorer(spice=False) as scorer:  # one METEOR JVM for both (~10 s to start)
    mine = scorer.score(REFS, CANDS)
    monkeypatch.setattr(coco_eval, 'Spice', _NoSpice)
    monkeypatch.setattr(coco_eval, 'Meteor', lambda: scorer.meteor)
    ref = coco_eval.COCOEvalCap(coco, res)
    ref.evaluate()
  assert mine == {k: ref.eval[k] for k in captions.METRICS}
  assert 0 < mine['CIDEr'] and 0 < mine['Bleu_4'] < mine['Bleu_1'] < 1


@pytest.mark.parametrize('refs, cands, match', [
    (REFS, {7: 'a cat'}, r'3 image id\(s\) without a candidate, e\.g\. \[11, 3, 42\]'),
    ({7: ['a cat']}, {7: 'a cat', 8: 'a dog'}, r'candidate image id\(s\) without references, e\.g\. \[8\]'),
    ({7: ['a cat'], 8: []}, {7: 'a cat', 8: 'a dog'}, r'Image id 8 has references \[\]; expected a non-empty list'),
    ({7: 'a cat'}, {7: 'a cat'}, r'Image id 7 has references .a cat.; expected a non-empty list'),
    ({7: ['a cat']}, {7: ['a cat']}, r"Image id 7 has candidate \['a cat'\]; expected one caption"),
    ({}, {}, 'No references'),
], ids=['missing', 'extra', 'empty_refs', 'refs_string', 'candidate_list', 'nothing'])
def test_bad_input(refs, cands, match):
  with pytest.raises(ValueError, match=match):
    captions.score(refs, cands)


def test_spice_required_but_absent():
  if not captions.spice_jars():
    pytest.skip('SPICE jars are installed here')
  with pytest.raises(FileNotFoundError, match='SPICE needs'):
    captions.Scorer(spice=True)


def test_java_missing(monkeypatch, tmp_path):
  monkeypatch.setenv('PATH', str(tmp_path))  # no java here
  with pytest.raises(FileNotFoundError, match='need Java on PATH.*--nocaptions'):
    captions.Scorer()
