"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE).

A thin wrapper: the inputs are checked here, at the boundary, then both sides go through
pycocoevalcap's PTB tokenizer and its scorers exactly as its `COCOEvalCap` does, so the numbers
are the COCO caption evaluation's. The tokenizer, METEOR and SPICE run Java. SPICE needs the
Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads at first use; where they are absent
(offline machines) it is skipped with one logged line instead.

pycocoevalcap's tokenizer and SPICE write temporary files beside their own module, which fails
where site-packages is read-only; `Scorer` runs them from a copy of the module in a temporary
folder, beside links to their jars (see `_writable_copy`), so their code runs unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Hashable

from absl import logging
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models

# Metric names as pycocoevalcap's COCOEvalCap.eval writes them, in its order.
METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')
SPICE = 'SPICE'


def spice_jars() -> list[str]:
  """The CoreNLP jars SPICE needs that are missing (empty when SPICE can run)."""
  lib = os.path.join(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB)
  jar = get_stanford_models.JAR
  return [p for p in (os.path.join(lib, f'{jar}.jar'), os.path.join(lib, f'{jar}-models.jar'))
          if not os.path.isfile(p)]


def _writable_copy(module: str, links: Sequence[str], workdir: str):
  """pycocoevalcap's `module` loaded from a copy of its file in a new folder under `workdir`,
  beside links to the `links` (jars, folders) of its own folder. Its code looks for those next to
  its `__file__` and writes its temporary files there, so they now go to `workdir`."""
  origin = importlib.util.find_spec(module).origin
  package, name = module.rsplit('.', 1)
  folder = os.path.join(workdir, name)
  os.makedirs(folder)
  shutil.copy(origin, folder)
  for link in links:
    os.symlink(os.path.join(os.path.dirname(origin), link), os.path.join(folder, link))
  # Named inside its package so that its relative imports resolve; not put in sys.modules.
  spec = importlib.util.spec_from_file_location(f'{package}._cpeft_copy_of_{name}',
                                                os.path.join(folder, os.path.basename(origin)))
  copy = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(copy)
  return copy


def _spice_cache() -> str:
  """SPICE's parse cache: its folder in the package where writable, else a per-user folder."""
  for cache in (os.path.join(get_stanford_models.SPICEDIR, 'cache'),
                os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
                             'cpeft_jax', 'spice')):
    try:
      os.makedirs(cache, exist_ok=True)
      if os.access(cache, os.W_OK):
        return cache
    except OSError:
      pass
  raise PermissionError(f'SPICE needs a writable cache folder; neither {cache} nor the '
                        'pycocoevalcap package\'s spice/cache is writable (set XDG_CACHE_HOME).')


def check(references: Mapping[Hashable, Sequence[str]],
          candidates: Mapping[Hashable, str]) -> None:
  """Raises ValueError unless every image has >= 1 reference string and exactly one candidate."""
  if not references:
    raise ValueError('No references: expected {image_id: [reference captions]} for >= 1 image.')
  missing = [k for k in references if k not in candidates]
  extra = [k for k in candidates if k not in references]
  problems = []
  if missing:
    problems.append(f'{len(missing)} image id(s) without a candidate, e.g. {missing[:3]}')
  if extra:
    problems.append(f'{len(extra)} candidate image id(s) without references, e.g. {extra[:3]}')
  if problems:
    raise ValueError('Candidates and references must cover the same image ids: '
                     f'{"; ".join(problems)}.')
  for k, refs in references.items():
    if isinstance(refs, str) or not len(refs):
      raise ValueError(f'Image id {k!r} has references {refs!r}; expected a non-empty list of '
                       'reference caption strings.')
    if not all(isinstance(r, str) for r in refs):
      raise ValueError(f'Image id {k!r} has a reference that is not a string: {list(refs)!r}.')
    if not isinstance(candidates[k], str):
      raise ValueError(f'Image id {k!r} has candidate {candidates[k]!r}; expected one caption '
                       'string per image.')


class Scorer:
  """COCO metrics with one METEOR process (a JVM that loads its paraphrase table, seconds to
  start) kept for every `score` call until `close`; use as a context manager.

  spice: None runs SPICE only where its jars are present (else one logged line); True
  requires them; False never runs it.
  """

  def __init__(self, *, spice: bool | None = None):
    if shutil.which('java') is None:
      raise FileNotFoundError('COCO caption metrics need Java on PATH (pycocoevalcap runs its '
                              'PTB tokenizer and METEOR as Java programs); install a JRE, or '
                              'evaluate perplexity only (evaluate.py --nocaptions).')
    missing = spice_jars()
    if spice and missing:
      raise FileNotFoundError(f'SPICE needs {missing} (Stanford CoreNLP 3.6.0, which '
                              'pycocoevalcap downloads at first use), absent here.')
    if spice is None and missing:
      logging.warning('SPICE skipped: it needs %s, which pycocoevalcap downloads at first use.',
                      ', '.join(missing))
    self.spice = spice is not False and not missing
    self._workdir = tempfile.TemporaryDirectory(prefix='cpeft_cocoeval_')
    self._tokenizer = _writable_copy('pycocoevalcap.tokenizer.ptbtokenizer',
                                     ['stanford-corenlp-3.4.1.jar'], self._workdir.name)
    if self.spice:
      self._spice = _writable_copy('pycocoevalcap.spice.spice', ['spice-1.0.jar', 'lib'],
                                   self._workdir.name)
      os.symlink(_spice_cache(), os.path.join(self._workdir.name, 'spice', 'cache'))
    self.meteor = Meteor()  # reads its jar and data beside it, writes nothing

  def __enter__(self) -> Scorer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self.meteor.meteor_p.kill()
    self.meteor.meteor_p.wait()
    self._workdir.cleanup()

  def score(self, references: Mapping[Hashable, Sequence[str]],
            candidates: Mapping[Hashable, str]) -> dict[str, float]:
    """Corpus-level metrics of `candidates` ({image_id: caption}) against `references`
    ({image_id: [captions]}), under pycocoevalcap's names (METRICS, plus SPICE when it runs)."""
    check(references, candidates)
    tokenizer = self._tokenizer.PTBTokenizer()
    gts = tokenizer.tokenize({k: [{'caption': r} for r in refs]
                              for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{'caption': candidates[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = dict(zip(METRICS[:4], bleu))
    out['METEOR'], _ = self.meteor.compute_score(gts, res)
    out['ROUGE_L'], _ = Rouge().compute_score(gts, res)
    out['CIDEr'], _ = Cider().compute_score(gts, res)
    if self.spice:
      out[SPICE], _ = self._spice.Spice().compute_score(gts, res)
    return {k: float(v) for k, v in out.items()}


def score(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], *,
          spice: bool | None = None) -> dict[str, float]:
  """`Scorer.score` with a METEOR process of its own (inputs checked before Java starts)."""
  check(references, candidates)
  with Scorer(spice=spice) as scorer:
    return scorer.score(references, candidates)
