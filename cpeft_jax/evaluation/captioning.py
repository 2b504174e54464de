"""Generated captions of whole splits, their COCO metrics, heatmaps and the files under DIR/eval.

Every image of a split is captioned once (greedy, or beam search with num_beams > 1) by the
jitted KV-cache search of `generate`, from its evaluation batches (the last one padded; padded
rows are dropped). Candidates are scored against all of the image's reference captions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import PIL.Image
import tqdm

from jax.experimental import multihost_utils

from cpeft_jax import contexts, experiment, hosts, runs
from cpeft_jax.data import layout, pipeline
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.evaluation import captions as captions_lib
from cpeft_jax.evaluation import generate as generate_lib
from cpeft_jax.evaluation import heatmaps, perplexity
from cpeft_jax.runs import Restored


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How captions are generated; from flags, else config.eval, else the defaults below."""
  num_beams: int = 1
  max_new_tokens: int = 0  # 0: as many as a training row holds (caption budget + EOS)
  length_penalty: float = 1.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **flags) -> Decoding:
    """Flags that are not None win over config.eval's fields; checked here, not under jit."""
    e = config.get('eval', {})
    values = {f.name: e.get(f.name, f.default) for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in flags.items() if v is not None})
    for name in ('num_beams', 'max_new_tokens'):
      v = values[name]
      if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == 'num_beams' else 0):
        raise ValueError(f'{name} must be an int >= {1 if name == "num_beams" else 0} '
                         f'(0: the caption budget), got {v!r}.')
    return cls(**values)


@dataclasses.dataclass
class Caption:
  image_id: int
  index: int  # the image's position in its split
  tokens: list[int]  # generated ids, EOS and padding removed
  text: str


def max_new_tokens(r: Restored, decoding: Decoding) -> int:
  """decoding.max_new_tokens, or the caption budget of a training row plus its EOS."""
  c = r.exp.config
  budget = layout.caption_budget(r.exp.num_image_tokens, c.data.seq_len,
                                 c.connector.boundary_tokens) + 1
  return decoding.max_new_tokens or budget


def text_context(config) -> int:
  """The adaptor context of generated caption tokens under the config's context map (a preset,
  a kind map, or rules that may also look at the task)."""
  return contexts.context_of(config.data.context_map, 'text', 'caption',
                             pipeline.config_tasks(config))


def generate_split(r: Restored, split, decoding: Decoding, *, desc: str = '',
                   progress: bool = True) -> list[Caption]:
  """One generated caption per image of `split`, in split order (`desc`: the progress bar's)."""
  exp = r.exp
  ids = tokenizer_lib.special_ids(exp.tokenizer)
  variables = generate_lib.prepare(exp.model, r.variables)  # once for every batch
  data = exp.batches(split, train=False, all_references=False)
  index = {int(i): n for n, i in enumerate(split.image_ids)}
  out = []
  for batch in tqdm.tqdm(data.epoch(0), total=len(data), unit='batch', file=sys.stderr,
                         desc=desc or f'{split.name} captions',
                         disable=not progress or not hosts.is_lead()):
    # Each host's rows go in as its part of global arrays; every host gets all captions back.
    gen = generate_lib.generate(
        exp.model, variables, experiment.device_batch(exp, batch),
        max_new_tokens=max_new_tokens(r, decoding), eos_id=ids.eos,
        text_context=text_context(exp.config), pad_id=ids.pad, num_beams=decoding.num_beams,
        length_penalty=decoding.length_penalty,
        prompt_len=generate_lib.prompt_length(batch['kinds']))
    gen_BT, image_ids, valid_B = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                  for x in (gen, batch['image_ids'], batch['valid']))
    for image_id, valid, row in zip(image_ids, valid_B, gen_BT):
      if not valid:
        continue
      ended = np.flatnonzero(row == ids.eos)
      tokens = row[:ended[0] if len(ended) else len(row)].tolist()
      text = exp.tokenizer.decode(tokens, skip_special_tokens=True).strip()
      out.append(Caption(int(image_id), index[int(image_id)], tokens, text))
  return out


def references(split) -> dict[int, list[str]]:
  """{image_id: reference captions} of a split; image ids must be unique."""
  refs = {}
  for image_id, caps in zip(split.image_ids, split.captions):
    if int(image_id) in refs:
      raise ValueError(f'Split {split.name!r} has image id {int(image_id)} more than once; '
                       'references are keyed by image id.')
    refs[int(image_id)] = list(caps)
  return refs


def score(scorer: captions_lib.Scorer, split, generated: list[Caption]) -> dict[str, float]:
  """COCO metrics of the generated captions against every reference of their images."""
  refs = references(split)
  return scorer.score({c.image_id: refs[c.image_id] for c in generated},
                      {c.image_id: c.text for c in generated})


def write_results(workdir: str, split_name: str, generated: list[Caption],
                  metrics: dict[str, Any]) -> tuple[str, str]:
  """DIR/eval/<split>_captions.json (COCO results format) and <split>_metrics.json."""
  folder = os.path.join(workdir, 'eval')
  paths = (os.path.join(folder, f'{split_name}_captions.json'),
           os.path.join(folder, f'{split_name}_metrics.json'))
  if jax.process_index() == 0:
    os.makedirs(folder, exist_ok=True)
    with open(paths[0], 'w') as f:
      json.dump([{'image_id': c.image_id, 'caption': c.text} for c in generated], f, indent=1)
    with open(paths[1], 'w') as f:
      json.dump(metrics, f, indent=2)
  return paths


def check_layer(r: Restored, layer: int) -> None:
  """Refuses a heatmap layer the decoder does not have (before any caption is generated)."""
  n = r.exp.model.decoder_cfg.num_layers
  if not -n <= layer < n:
    raise ValueError(f'Heatmap layer {layer} does not exist: the decoder has {n} layers '
                     f'(valid: {-n}..{n - 1}).')


def write_heatmaps(r: Restored, split, name: str, generated: list[Caption], workdir: str, *,
                   count: int, layer: int = -1) -> list[str]:
  """Heatmap sheets (image, whole caption, each token) of the first `count` captions of split
  `name`, as DIR/eval/heatmaps/<name>_<image_id>_layer<layer>.png (layer counted from 0)."""
  check_layer(r, layer)
  exp, chosen = r.exp, generated[:count]
  layer %= exp.model.decoder_cfg.num_layers
  if not chosen:
    return []
  c = exp.config
  images = [_image(split, g.index, exp.image_size) for g in chosen]
  x = np.stack([(im.astype(np.float32) / 255.0 - np.asarray(exp.image_mean, np.float32))
                / np.asarray(exp.image_std, np.float32) for im in images])
  grids = heatmaps.caption_grids(
      exp.model, r.variables, x, [g.tokens for g in chosen], layer=layer,
      num_image_tokens=exp.num_image_tokens, seq_len=c.data.seq_len,
      ids=tokenizer_lib.special_ids(exp.tokenizer), boundary=c.connector.boundary_tokens,
      context_map=c.data.context_map)
  paths = []
  for g, image, (whole, per_token) in zip(chosen, images, grids):
    words = exp.tokenizer.convert_ids_to_tokens(g.tokens)
    path = os.path.join(workdir, 'eval', 'heatmaps',
                        f'{name}_{g.image_id}_layer{layer}.png')
    if jax.process_index() == 0:
      heatmaps.write(path, image, [('caption', whole), *zip(words, per_token)])
    paths.append(path)
  return paths


def _image(split, index: int, size: int) -> np.ndarray:
  """The image as the evaluation batches see it before normalisation (uint8, size x size)."""
  img = split.image(index)
  if img.shape[:2] != (size, size):
    img = np.asarray(PIL.Image.fromarray(img).resize((size, size), PIL.Image.BICUBIC))
  return img


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                     checkpoint: str = 'best', splits: list[str] | None = None,
                     decoding: Decoding | None = None, captions: bool = True,
                     heatmap_count: int = 0, heatmap_layer: int = -1, show: int = 3,
                     config_name: str = 'the given config') -> dict[str, Any]:
  """evaluate.py's work: per split perplexity and (with `captions`) generated captions, their
  COCO metrics and heatmaps, printed and written under DIR/eval; returns metrics.json's dict.

  On several processes every one calls it: each computes on its rows of every batch, and
  process 0 scores the gathered captions, prints and writes (its result has the caption
  metrics; the others' has perplexity only).
  """
  decoding = decoding or Decoding.from_config(config)
  if heatmap_count < 0 or (heatmap_count and not captions):
    raise ValueError(f'heatmaps={heatmap_count}: expected a count >= 0, and heatmaps are drawn '
                     'for generated captions (not without captions).')
  if heatmap_count and jax.process_count() > 1:
    raise ValueError(f'heatmaps={heatmap_count} on {jax.process_count()} processes: heatmaps '
                     'are drawn by one process; run the heatmaps on one host.')
  lead = hosts.is_lead()
  say = print if lead else (lambda *args, **kwargs: None)
  r = runs.restore(config, workdir, checkpoint=checkpoint, config_name=config_name)
  if heatmap_count:
    check_layer(r, heatmap_layer)
  data = perplexity.open_splits(config, workdir, splits)
  ckpt = dataclasses.asdict(r.ckpt)
  used = dataclasses.asdict(dataclasses.replace(decoding,
                                                max_new_tokens=max_new_tokens(r, decoding)))
  result = {'checkpoint': ckpt, **({'decoding': used} if captions else {}), 'splits': {}}
  scorer = captions_lib.Scorer() if captions and lead else None
  try:
    for name, split in data.items():
      m = perplexity.split_perplexity(r, split, name=name, progress=lead)
      say(f"{name}: caption loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f} "
            f"({m['images']} images; {r.ckpt.kind} checkpoint, step {r.ckpt.step})")
      if captions:
        generated = generate_split(r, split, decoding, desc=f'{name} captions')
        if scorer is not None:
          m.update(score(scorer, split, generated))
        say(f'{name}: ' + ', '.join(f'{k} {m[k]:.4f}' for k in captions_lib.METRICS +
                                      (captions_lib.SPICE,) if k in m))
        refs = references(split)
        for g in generated[:show]:
          say(f'  image {g.image_id}: {g.text!r}')
          for ref in refs[g.image_id][:3]:
            say(f'      ref: {ref!r}')
        paths = write_results(workdir, name, generated,
                              {'checkpoint': ckpt, 'decoding': used, 'split': name, **m})
        say(f'wrote {paths[0]}, {paths[1]}')
        maps = write_heatmaps(r, split, name, generated, workdir, count=heatmap_count,
                              layer=heatmap_layer)
        if maps:
          say(f'wrote {len(maps)} heatmaps to {os.path.dirname(maps[0])}')
      result['splits'][name] = m
  finally:
    if scorer is not None:
      scorer.close()
  say(f'wrote {perplexity.write_metrics(workdir, result)}')
  return result
