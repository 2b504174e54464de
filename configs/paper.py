"""The paper's COCO captioning grid (Tables 1-3) as variants of one config.

Usage: --config=configs/paper.py:method=lora,rank=64,targets=AF,contexts=specific,encoder=large
  method: ia3 | bitfit | lora (PEFT, '+' combines them) | none (projection only: the connector
    trains, the LM is frozen) | full (full fine-tuning of the LM and connector)
  rank: LoRA rank (the paper: 1, 8, 64); targets: A (attention), F (feed-forward), AF
  contexts: agnostic (one adaptor group) | specific (image and text groups)
  encoder: tiny | large (frozen Swin V2, 256 px, 64 tokens), or a checkpoint dir / hub id
  text_model: a Llama-style checkpoint dir or cached hub id. The paper's ~150M LM was not
    released; the default, HuggingFaceTB/SmolLM2-135M (576 wide, 30 layers), is a stand-in, so
    parameter counts and perplexities differ from the paper's (configs/paper_llm150m.py has its
    exact shape). Its own tokenizer is used.
    text_model=standin: a stand-in closer to the paper's: its LM shape (configs/paper_llm150m.py)
    with OPT-125m's input embeddings (frozen throughout) and tokenizer, pre-trained as a text LM
    on the training captions first (stage 0: pretrain.epochs, into DIR/base_lm; the paper's LM
    saw other text, which it does not name), then frozen like any checkpoint.
  dataset: coco_captions (TFDS, Karpathy splits) | folder (set data.captions_json)
`grid()` lists the arg strings of the whole grid. Hyper-parameters are the paper's section 4.1.

The paper's recipe, and where this config still differs (paper vs ours):
  - Full fine-tuning (method=full) trains the LM and connector with the input embedding table
    frozen, as the paper does (train.full_embeddings=True trains it too). SmolLM2 ties its LM
    head to that table, so the head stays frozen as well; the paper's LM has an untied head,
    which trains (configs/paper_llm150m.py). `python -m cpeft_jax.params --grid` counts that
    row for the paper's shape as 151,874,304 (the LM less its 38,608,896 input embeddings); the
    paper's Table 3 says 153,196,032, 1,321,728 more, which its text does not explain (the
    connector would be 590,592 with Swin-tiny).
  - Validation perplexity averages over every reference caption of each image, as the authors'
    code does (eval.all_references=True: five times the pairs of first captions only; False:
    each image's first caption, the library's default).
  - Training reads the Karpathy train split only, as the paper does (data.restval=True adds
    Karpathy's 'restval' images: a folder JSON's entries, or TFDS 'train+restval').
  - The authors' per-token adaptor dropout on the context mask: train.adaptor_dropout (0.0,
    off; the paper does not give a rate).
  - Not the paper's: the LM (SmolLM2-135M and its tokenizer by default; text_model=standin has
    the paper's shape and OPT-125m's embeddings and tokenizer, but its text pre-training is
    ours, on the training captions only), LoRA alpha = rank, and the augmentation strengths
    (the paper names flip, crop and colour jitter without strengths).
"""

import itertools

import ml_collections

from configs import paper_llm150m
from cpeft_jax import adaptors, configlib
from cpeft_jax.data import sources

ENCODERS = {
    'tiny': 'microsoft/swinv2-tiny-patch4-window8-256',
    'large': 'microsoft/swinv2-large-patch4-window12to16-192to256-22kto1k-ft',
}
METHODS = ('ia3', 'bitfit', 'lora', 'none', 'full')  # and '+' combinations of PEFT methods
CONTEXT_MAPS = {'agnostic': 'agnostic', 'specific': 'modality'}
PAPER_RANKS = (1, 8, 64)
STANDIN = 'standin'  # text_model=standin: the paper's LM shape with OPT-125m's embeddings
STANDIN_EMBEDDINGS = 'facebook/opt-125m'


def get_config(arg=None):
  a = configlib.parse_arg(arg, method='lora', rank=8, targets='AF', contexts='specific',
                          encoder='tiny', text_model='HuggingFaceTB/SmolLM2-135M',
                          dataset='coco_captions')
  if a.method in ('none', 'full'):
    methods = ()
  else:
    methods = tuple(a.method.split('+'))
    if not methods or any(m not in adaptors.METHODS for m in methods):
      raise ValueError(f'method={a.method!r}; expected one of {METHODS} or a '
                       f"'+' combination of {adaptors.METHODS}.")
  if a.dataset not in sources.DATASETS:
    raise ValueError(f'dataset={a.dataset!r}; expected one of {sources.DATASETS}.')
  if a.contexts not in CONTEXT_MAPS:
    raise ValueError(f'contexts={a.contexts!r}; expected one of {tuple(CONTEXT_MAPS)}.')
  if a.encoder not in ENCODERS and '/' not in a.encoder:
    raise ValueError(f'encoder={a.encoder!r}; expected one of {tuple(ENCODERS)}, a checkpoint '
                     'directory or a hub id.')

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
      dataset=a.dataset, data_dir='', train_split='train', eval_split='val',
      # dataset=folder: a COCO- or Karpathy-format JSON (and the evaluation split's own file).
      captions_json='', eval_captions_json='', image_dir='',
      restval=False,  # True: Karpathy's 'restval' images join train (the paper: train only)
      seq_len=128,  # BOS + 64 image tokens + up to 62 caption tokens + EOS, then PAD
      context_map=CONTEXT_MAPS[a.contexts],
      # The paper names flip, crop and colour jitter but not their strengths.
      augment=dict(flip=True, crop_min_scale=0.8, brightness=0.1, contrast=0.1,
                   saturation=0.1),
      # Processes building batches (the same batches as 0, a thread). One builds ~200-290
      # examples/s at 256x256 with augmentation (BENCHMARKS.md, 2 loaded cores); 8 should give
      # several times that where the host has the cores (not measured here), enough for an
      # accelerator host's steps of 96, and leave its other cores to the trainer.
      workers=8)
  c.tokenizer = a.text_model  # the text model's own tokenizer: change both together
  c.text_model = a.text_model
  # Stage 0 of text_model=standin (none otherwise): text-only pre-training of the LM.
  c.pretrain = dict(epochs=0, batch_size=96, learning_rate=3e-4,
                    embeddings='')  # a checkpoint whose frozen input embeddings the LM takes
  if a.text_model == STANDIN:
    c.tokenizer, c.text_model = STANDIN_EMBEDDINGS, ''
    c.pretrain.update(epochs=4, embeddings=STANDIN_EMBEDDINGS)
  c.vision = dict(kind='hf', path=ENCODERS.get(a.encoder, a.encoder), feature_layer=-1,
                  drop_cls=True, dtype='bfloat16')  # frozen: weights and compute in bf16
  # Checkpoint tensors (fnmatch patterns of their names) allowed to be missing from text_model
  # and the encoder, which then keep their random init; anything else missing is an error.
  c.partial_load = ()
  # text_model's config.json decides the decoder's shape; these set its numerics. Mixed
  # precision: bf16 compute, float32 weights (adaptor tables and connector are float32 too).
  c.model = dict(dtype='bfloat16', param_dtype='float32', residual_dropout=0.1,
                 remat=False)  # True: recompute each layer in the backward pass
  if a.text_model == STANDIN:  # the paper's shape; a checkpoint's config.json decides otherwise
    c.model.update({k: v for k, v in paper_llm150m.get_config().model.items()
                    if k not in c.model})
  c.connector = dict(kind='linear', dropout=0.1, pre_norm=False, boundary_tokens=False)
  c.peft = dict(
      methods=methods, targets=a.targets.replace(';', ','),
      num_contexts=2 if a.contexts == 'specific' else 1,
      # The paper does not state alpha; alpha = rank keeps the LoRA scale at 1.
      lora=dict(rank=a.rank, alpha=float(a.rank), dropout=0.0), strategy='auto')
  mode = {'none': 'connector', 'full': 'full'}.get(a.method, 'peft')
  c.train = dict(mode=mode, batch_size=96, epochs=8, micro_steps=1, log_every=100,
                 checkpoint_every=1000, max_zero_grad_steps=20,
                 export=True,  # DIR/export: the adaptor-only copy of the best weights
                 freeze_connector=False, freeze_contexts=(),
                 # mode=full: False keeps the input embedding table frozen, as the paper does
                 full_embeddings=False,
                 adaptor_dropout=0.0)  # per-token: a token loses its adaptor (the authors')
  c.eval = dict(batch_size=96, num_beams=1, max_new_tokens=0,
                # validation PPL over all references, as the authors (False: first captions)
                all_references=True)
  c.optim = dict(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                 schedule='constant', warmup_steps=0, total_steps=0, grad_clip_norm=0.0)
  return c


def grid(encoders=tuple(ENCODERS)) -> list[str]:
  """The arg strings of the paper's grid: 64 runs for both encoders.

  Per encoder: {IA3, BitFit, LoRA r=1, 8, 64} x {A, F, AF} x {agnostic, specific}, plus
  projection only and full fine-tuning.
  """
  adaptors_ = [('ia3', None), ('bitfit', None)] + [('lora', r) for r in PAPER_RANKS]
  out = []
  for enc in encoders:
    for (method, rank), targets, contexts in itertools.product(
        adaptors_, ('A', 'F', 'AF'), tuple(CONTEXT_MAPS)):
      rank_arg = f',rank={rank}' if rank else ''
      out.append(f'method={method}{rank_arg},targets={targets},contexts={contexts},'
                 f'encoder={enc}')
    out += [f'method=none,encoder={enc}', f'method=full,encoder={enc}']
  return out
