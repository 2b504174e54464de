"""VQA-style plug-ins on the offline demo: a captioning plug-in and a QA plug-in, trained in
separate runs on one frozen base, assembled into one model and fine-tuned on a mixed batch.

    python train.py --config=configs/demo_vqa.py:stage=caption --workdir=runs/caption
    python train.py --config=configs/demo_vqa.py:stage=qa,base=runs/caption --workdir=runs/qa
    python -m cpeft_jax.plugins --workdir=runs/caption --context=0 --out=runs/p/caption
    python -m cpeft_jax.plugins --workdir=runs/qa --context=0 --out=runs/p/qa
    A=stage=assemble,base=runs/caption,caption_plugin=runs/p/caption,qa_plugin=runs/p/qa
    python train.py --config=configs/demo_vqa.py:$A --workdir=runs/vqa
    python evaluate.py --config=configs/demo_vqa.py:$A --workdir=runs/vqa --nocaptions

Stages (the `stage` arg):
- caption: captions of the scenes, every token in context 0. It also pre-trains the shared base
  (the demo's stage 0: a small decoder as a text LM, saved as a Hugging Face checkpoint in
  DIR/base_lm with its tokenizer, built from both tasks' texts) and builds the dataset.
- qa: questions about the scenes ('what color is the circle ?' -> 'red'; the question is a
  prompt, only the answer is predicted), every token in context 0, on the caption run's base
  (`base=` its workdir: its base_lm, tokenizer and dataset).
- assemble: both plug-ins loaded (`peft.plugins`, checked against this run's base), caption
  in context 0 and QA in context 1, and fine-tuned briefly on a batch that mixes both tasks,
  each example routed to its task's context (`data.context_map` rules 'task=qa:1;*:0');
  `freeze=caption` (or `qa`) keeps that plug-in's rows exactly as loaded.
The connector is frozen at its seed's initialisation in every stage (`train.freeze_connector`):
a plug-in's tables were trained on what the connector fed the decoder, so it is part of the
base the plug-ins share, like the frozen random patch encoder.
`train.plugins=True` (`--config.train.plugins`) also writes each context's plug-in of a run's
best weights to DIR/plugins/<context> when it ends.
Other args: method, rank, epochs (0: the stage's default), num_train, pretrain_epochs, seed.
"""

import os

from configs import demo
from cpeft_jax import configlib

STAGES = ('caption', 'qa', 'assemble')
TASKS = ('caption', 'qa')


def get_config(arg=None):
  a = configlib.parse_arg(arg, stage='caption', base='', caption_plugin='', qa_plugin='',
                          freeze='', method='lora', rank=8, epochs=0, num_train=1000,
                          pretrain_epochs=2, seed=0)
  if a.stage not in STAGES:
    raise ValueError(f'configs/demo_vqa.py: stage={a.stage!r}; expected one of {STAGES}.')
  if a.stage != 'caption' and not a.base:
    raise ValueError(f'configs/demo_vqa.py: stage={a.stage} needs base=<the caption run\'s '
                     'workdir> (its base_lm, tokenizer and dataset are shared by every stage).')
  plugins = (a.caption_plugin, a.qa_plugin)
  if a.stage == 'assemble' and not all(plugins):
    raise ValueError('configs/demo_vqa.py: stage=assemble needs caption_plugin=DIR and '
                     'qa_plugin=DIR (plug-ins written by python -m cpeft_jax.plugins).')
  if a.freeze and (a.freeze not in TASKS or a.stage != 'assemble'):
    raise ValueError(f'configs/demo_vqa.py: freeze={a.freeze!r}; expected one task of {TASKS}, '
                     'with stage=assemble.')
  epochs = a.epochs or {'caption': 3, 'qa': 3, 'assemble': 1}[a.stage]
  c = demo.get_config(f'contexts=agnostic,method={a.method},rank={a.rank},epochs={epochs},'
                      f'num_train={a.num_train},pretrain_epochs={a.pretrain_epochs}')
  c.seed = a.seed  # one seed for every stage: it initialises the shared encoder and connector
  c.data.tasks = TASKS if a.stage == 'assemble' else (a.stage,)
  c.pretrain.tasks = TASKS  # the shared base and its vocabulary cover both tasks' texts
  c.train.freeze_connector = True
  c.train.plugins = False  # True: DIR/plugins/<context> at the end of the run
  c.connector.dropout = 0.0
  c.peft.lora.alpha = float(2 * a.rank)
  if a.base:
    c.text_model = os.path.join(a.base, 'base_lm')
    c.data.data_dir = os.path.join(a.base, 'tfds')
  if a.stage == 'assemble':
    c.data.context_map = 'task=qa:1;*:0'
    c.peft.num_contexts = 2
    c.peft.plugins = list(plugins)  # plug-in i in context i
    c.train.freeze_contexts = (TASKS.index(a.freeze),) if a.freeze else ()
    c.optim.update(learning_rate=1e-3, warmup_steps=10)
  return c
