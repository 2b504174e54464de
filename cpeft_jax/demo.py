"""The embedded demo: one shared stage 0, then one Context-PEFT run per context map, compared.

Stage 0 pre-trains the demo's base models once (pretrain.py): a tiny CLIP vision tower on the
scenes' labels (DIR/base_vision) and a tiny Llama decoder on the caption text (DIR/base_lm),
both saved as Hugging Face checkpoints. Every variant of config.variants (a context map such
as 'agnostic' or 'modality') then trains in DIR/<variant> with trainer.train_and_evaluate, loading
both checkpoints frozen through the same loaders as real ones, and captions a few validation
images with its best weights. One table compares the variants. Rerunning skips what is done.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import ml_collections
import numpy as np

from cpeft_jax import catalog, checkpoints, contexts, experiment, runs, schema
from cpeft_jax import workdir as workdir_lib
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.evaluation import generate as generate_lib
from cpeft_jax.train import pretrain, trainer

RESULT = 'demo_result.json'


def shared_bases(config: ml_collections.ConfigDict,
                 workdir: str) -> ml_collections.ConfigDict:
  """`config` loading the stage-0 checkpoints of `workdir` (vision.kind='hf' from
  DIR/base_vision, text_model DIR/base_lm) and reading the shared prepared dataset."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.data.data_dir = config.data.data_dir or os.path.join(workdir, workdir_lib.TFDS)
    c.vision = dict(kind='hf', path=os.path.join(workdir, workdir_lib.BASE_VISION), dtype='float32',
                    feature_layer=-1, drop_cls=True)
    c.text_model = os.path.join(workdir, workdir_lib.BASE_LM)
  return c


def variant_config(config: ml_collections.ConfigDict, workdir: str,
                   variant: str) -> ml_collections.ConfigDict:
  """The single-run config of one variant: its context map, the shared stage-0 checkpoints
  (vision.kind='hf', text_model) and the shared prepared dataset."""
  c = shared_bases(config, workdir)
  with c.unlocked():
    del c['variants']
    c.data.context_map = variant
    c.peft.num_contexts = contexts.num_contexts(variant)
  return c


def stage0(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  """(vision tower directory, text decoder directory), trained now unless already there."""
  c = shared_bases(config, workdir)
  train = experiment.open_split(c, workdir, c.data.train_split)
  vision = pretrain.vision_encoder(config, workdir, train,
                                   experiment.open_split(c, workdir, c.data.eval_split))
  tower = checkpoints.vision_module(checkpoints.read_config(checkpoints.resolve(vision)),
                                    drop_cls=True)
  tok = tokenizer_lib.word_level(t for caps in train.captions for t in caps)
  text = pretrain.text_lm(config, workdir, train, tok, tower.cfg.num_tokens)
  return vision, text


def with_bases(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The config a run of `config` trains with, its frozen bases decided here for the demo and
  the sweep alike: a config naming a text_model (the paper's) loads its checkpoints as
  configured; the demo's (no text_model: nothing to download) get stage 0's, pre-trained once
  in `workdir` (skipped when already there) and shared by every run under it; a config with a
  real vision tower and a decoder to pre-train (configs/paper.py:text_model=standin) gets that
  decoder, pre-trained once in `workdir`."""
  if config.text_model:
    return config
  if config.get('pretrain', {}).get('vision'):
    stage0(config, workdir)
    return shared_bases(config, workdir)
  c = copy.deepcopy(config)
  c.text_model = pretrained_lm(config, workdir)
  return c


def pretrained_lm(config: ml_collections.ConfigDict, workdir: str) -> str:
  """DIR/base_lm: the config's decoder (config.model, pretrain) pre-trained as a text LM on the
  training captions, with the tokenizer of config.tokenizer, for rows of the caption segment
  that config.vision's tower leaves; trained now unless already there."""
  train = experiment.open_split(config, workdir, config.data.train_split)
  tok = experiment.tokenizer(config, workdir, train)
  v = config.vision
  tower = checkpoints.encoder_module(checkpoints.read_config(catalog.resolve(v.path)),
                                     feature_layer=v.get('feature_layer', -1),
                                     drop_cls=v.get('drop_cls', True))
  return pretrain.text_lm(config, workdir, train, tok, tower.cfg.num_tokens)


def captions(config: ml_collections.ConfigDict, workdir: str, num: int) -> dict:
  """Trainable-parameter count and `num` greedy captions (with a reference each) of the first
  validation images, from the run's best weights."""
  split = experiment.open_split(config, workdir, config.data.eval_split)
  r = runs.restore(config, workdir, checkpoint='best')
  exp = r.exp
  batch = exp.batches(split, train=False, all_references=False).batch(0, 0)
  batch = {k: v[:num] for k, v in batch.items()}
  ids = tokenizer_lib.special_ids(exp.tokenizer)
  text_context = contexts.validate(config.data.context_map)['text']
  out_BT = np.asarray(generate_lib.generate(
      exp.model, r.variables, batch,
      max_new_tokens=config.data.seq_len - exp.num_image_tokens - 1, eos_id=ids.eos,
      pad_id=ids.pad, text_context=text_context))
  texts = []
  for row in out_BT:
    end = np.flatnonzero(row == ids.eos)
    texts.append(exp.tokenizer.decode(row[:end[0] if end.size else len(row)],
                                      skip_special_tokens=True))
  refs = [split.captions[i][0] for i in range(len(texts))]
  return {'trainable_params': int(sum(x.size for x in jax.tree.leaves(r.trainable))),
          'captions': [{'generated': g, 'reference': r} for g, r in zip(texts, refs)]}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Stage 0 once, then every variant; prints and returns {variant: result}."""
  schema.check(config)  # the demo config and each variant's, before any stage runs
  for variant in config.variants:
    schema.check(variant_config(config, workdir, variant))
  os.makedirs(workdir, exist_ok=True)
  with_bases(config, workdir)
  results = {}
  for variant in config.variants:
    path = os.path.join(workdir, variant)
    done = os.path.join(path, RESULT)
    if os.path.exists(done):
      with open(done) as f:
        results[variant] = json.load(f)
      continue
    c = variant_config(config, workdir, variant)
    print(f'stage 1, variant {variant!r}: Context-PEFT ({"+".join(c.peft.methods) or "none"}, '
          f'{c.peft.num_contexts} context(s)) in {path}', flush=True)
    out = trainer.train_and_evaluate(c, path)
    result = {'val_loss': out['val_loss'], 'val_ppl': out['val_ppl'], 'steps': out['steps'],
              **captions(c, path, config.eval.get('num_captions', 3))}
    if jax.process_index() == 0:
      with open(done, 'w') as f:
        json.dump(result, f, indent=2)
    results[variant] = result
  print(table(results), flush=True)
  return results


def table(results: dict[str, dict]) -> str:
  """The variants side by side, then each one's captions under a reference."""
  lines = [f'{"variant":<10} {"trainable":>10} {"val loss":>9} {"val PPL":>8}']
  for name, r in results.items():
    lines.append(f'{name:<10} {r["trainable_params"]:>10,} {r["val_loss"]:>9.4f} '
                 f'{r["val_ppl"]:>8.3f}')
  for name, r in results.items():
    lines.append(f'\ncaptions of the first validation images, {name}:')
    for k, cap in enumerate(r['captions']):
      lines.append(f'  [{k}] generated: {cap["generated"]}\n      reference: {cap["reference"]}')
  return '\n'.join(lines)
