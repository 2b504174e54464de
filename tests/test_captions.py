"""captions.score equals pycocoevalcap's own COCOEvalCap on a small fixed set, also from a
read-only pycocoevalcap; bad input errors."""

import ctypes
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pycocoevalcap
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


_READ_ONLY_RUN = """
import json, os, sys
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from cpeft_jax.evaluation import captions
# The read-only copy, not site-packages (pycocoevalcap is a namespace package: the first wins).
assert ptbtokenizer.__file__.startswith(sys.argv[1]), ptbtokenizer.__file__
try:
  PTBTokenizer().tokenize({1: [{'caption': 'a cat'}]})
  raise AssertionError('pycocoevalcap wrote into its read-only copy')
except PermissionError:
  pass  # what the wrapper works around
refs, cands = json.loads(sys.argv[2])
print(json.dumps(captions.score({int(k): v for k, v in refs.items()},
                                {int(k): v for k, v in cands.items()}, spice=False)))
"""


def _drop_permission_override():
  """In the child, before exec: root loses the capabilities that let it ignore permission bits
  (CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2), so a read-only folder is read-only to it."""
  libc = ctypes.CDLL(None, use_errno=True)
  for cap in (1, 2):
    if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
      raise OSError(ctypes.get_errno(), f'prctl(PR_CAPBSET_DROP, {cap}) failed')


def test_read_only_pycocoevalcap_scores_as_writable():
  """A copy of pycocoevalcap whose folders are read-only (its files linked to the installed
  ones), first on sys.path in a subprocess (which, when we are root, loses root's permission
  override): its own PTBTokenizer fails there; captions.score works and equals the installed
  package's scores."""
  if shutil.which('java') is None:
    pytest.skip('java is not on PATH: pycocoevalcap runs its PTB tokenizer and METEOR in Java')
  base = tempfile.mkdtemp(prefix='cpeft_ro_')
  try:
    site = os.path.join(base, 'site')
    copy = os.path.join(site, 'pycocoevalcap')
    shutil.copytree(list(pycocoevalcap.__path__)[0], copy, copy_function=os.symlink,
                    ignore=shutil.ignore_patterns('__pycache__'))
    for folder, _, _ in os.walk(copy):
      os.chmod(folder, 0o555)
    os.chmod(site, 0o555)
    home = os.path.join(base, 'home')
    os.mkdir(home)
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, repo]), HOME=home,
               PYTHONDONTWRITEBYTECODE='1')
    proc = subprocess.Popen(
        [sys.executable, '-c', _READ_ONLY_RUN, copy, json.dumps([REFS, CANDS])], cwd=home,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_drop_permission_override if os.geteuid() == 0 else None)
    writable = captions.score(REFS, CANDS, spice=False)  # meanwhile, from site-packages
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == writable
  finally:
    for folder, _, _ in os.walk(base):
      os.chmod(folder, 0o755)
    shutil.rmtree(base)
