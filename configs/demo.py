"""The offline demo: captioning procedurally drawn scenes, no download needed.

    python train.py --config=configs/demo.py --workdir=/tmp/demo
    python train.py --config=configs/demo.py:method=ia3,contexts=agnostic --workdir=...

With no `contexts` argument this is the two-variant demo (cpeft_jax/demo.py): stage 0
pre-trains its base models, since it has none to download (a tiny CLIP vision tower on the
scenes' labels, a tiny Llama-style decoder on the caption text; both saved as Hugging Face
checkpoints and loaded frozen like real ones), then context-agnostic and context-specific
(modality) Context-LoRA train on top, each in DIR/<variant>, and their validation perplexity
and a few captions are printed side by side. `contexts=agnostic|modality` is one run in DIR
with the frozen random patch encoder instead (vision.kind='patch') and the decoder of stage 0.
Args: method (lora | ia3 | bitfit | lora+bitfit | none), rank, contexts (agnostic | modality;
empty: both), mode (peft | connector | full), epochs, num_train (images), pretrain_epochs
(0: random decoder), vision_epochs (the vision tower's label pre-training), specs (per-context
adaptor specs, context 0 first, e.g. `specs=lora+bitfit:rank=8;lora:rank=32` for LoRA r=8 plus
BitFit on text tokens and LoRA r=32 on image tokens), targets (A | F | AF), warmup_steps,
patch (the image patch side in pixels, of stage 0's tower and of the patch encoder: 16 gives
16 image tokens, 8 gives 64), batch_size (stage 1's).

The schedule is what makes the captions right within about 10 minutes on 2 cores (issue 20):
16 image tokens (patch 16) instead of 64 (patch 8) cut a stage-1 row from 96 positions to 48,
so a step of batch 16 costs about 0.09 s where one of batch 32 cost 0.36 s, and stage 1 runs 6
epochs (1872 steps) where it ran 3 (468); the tower is 128 wide (was 96) and learns its labels
for 12 epochs (was 6). The whole command took 535 s here (2-core Xeon, quiet; before: about
9-12 min). Validation, greedy captions graded by `python -m cpeft_jax.data.demo.grading`
(groups named with the right count, colour and shape; captions with every group right):

                          val PPL  CIDEr  groups right  captions right
  before, agnostic          3.221   1.262      0.121          0.07
  before, modality          3.099   1.464      0.181          0.09
  now, agnostic             2.578   2.448      0.583          0.41
  now, modality             2.633   2.487      0.543          0.40
(before: `patch=8,batch_size=32,epochs=3,vision_epochs=6` with a 96-wide, 384-MLP tower.)

The tower on validation patches showing an object, before -> now: shape 0.73 -> 0.81, group
count 0.79 -> 0.92, colour 1.00 -> 0.99. With the longer schedule context-agnostic LoRA ends
slightly below context-specific in PPL (it was above at 3 epochs); captions are about even.
"""

import ml_collections

from cpeft_jax import configlib

IMAGE_SIZE = 64  # pixels: the demo's scenes, its tower's input and the patch encoder's


def get_config(arg=None):
  a = configlib.parse_arg(arg, method='lora', rank=16, contexts='', mode='peft',
                          epochs=6, num_train=1000, pretrain_epochs=2,
                          vision_epochs=12, specs='', targets='AF',
                          warmup_steps=50, patch=16, batch_size=16)
  if a.patch < 1 or IMAGE_SIZE % a.patch:
    raise ValueError(f'patch={a.patch}: the demo\'s {IMAGE_SIZE}-pixel images need a patch size '
                     f'that divides {IMAGE_SIZE} (e.g. 8 or 16).')
  num_image_tokens = (IMAGE_SIZE // a.patch)**2
  c = ml_collections.ConfigDict()
  c.seed = 0
  if not a.contexts:  # the two-variant demo; a single run (loop) still uses 'modality' below
    c.variants = ('agnostic', 'modality')
  contexts = a.contexts or 'modality'
  c.data = dict(
      dataset='demo', data_dir='', train_split='train', eval_split='validation',
      demo=dict(image_size=IMAGE_SIZE, num_train=a.num_train, num_validation=100, num_test=100),
      seq_len=1 + num_image_tokens + 31,  # BOS + image tokens + up to 30 caption tokens + EOS
      context_map=contexts,
      # No flips: the demo's captions say left and right. No colour jitter: they name colours.
      augment=dict(flip=False, crop_min_scale=1.0, brightness=0.0, contrast=0.0,
                   saturation=0.0),
      # Batches on a thread of the trainer (processes building them give the same batches):
      # on 2 cores the model step needs the other core, and each epoch would pay the
      # workers' start (seconds) on epochs of seconds.
      workers=0)
  c.tokenizer = 'word_level'  # built from the training captions, saved in the workdir
  # No checkpoint to download: stage 0 pre-trains the decoder below as a text-only LM on the
  # training captions and saves it as a Hugging Face checkpoint (workdir/base_lm), which is
  # then loaded frozen. Set text_model to a checkpoint directory or hub id to skip it.
  c.text_model = ''
  # Checkpoint tensors (fnmatch patterns of their names, e.g. ('lm_head.weight',) for a new
  # head) allowed to be missing from the loaded base models, which then keep their random init
  # with a warning; anything else missing from, or unused in, a checkpoint is an error.
  c.partial_load = ()
  c.pretrain = dict(epochs=a.pretrain_epochs, batch_size=64, learning_rate=3e-3,
                    embeddings='',  # a checkpoint whose input embeddings the decoder keeps
                    # The two-variant demo's vision tower: a tiny CLIP trained on scene labels
                    # (per patch: shape, colour, size and group count) of the training images
                    # and of extra_scenes more scenes drawn for it alone.
                    vision=dict(epochs=a.vision_epochs, batch_size=64, learning_rate=3e-3,
                                image_size=IMAGE_SIZE, patch_size=a.patch, hidden_size=128,
                                num_layers=3, num_heads=4, intermediate_size=512,
                                extra_scenes=6000))
  c.vision = dict(kind='patch', image_size=IMAGE_SIZE, patch_size=a.patch, width=96)
  c.model = dict(vocab_size=0,  # 0: the tokenizer's size
                 hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
                 rope_theta=10000.0, residual_dropout=0.1, dtype='float32',
                 remat=False)  # True: recompute each layer in the backward pass
  c.connector = dict(kind='linear', dropout=0.1, pre_norm=False, boundary_tokens=False)
  # The frozen base in 8 or 4 bits (cpeft_jax/quantize.py): --config.quantize.format=int4.
  c.quantize = dict(format='', granularity='block', block_size=64, targets='decoder')
  methods = () if a.method == 'none' else tuple(a.method.split('+'))
  c.peft = dict(methods=methods, targets=a.targets,
                num_contexts=2 if contexts == 'modality' else 1,
                lora=dict(rank=a.rank, alpha=float(a.rank), dropout=0.0), strategy='auto')
  if a.specs:  # per-context specs, context 0 first (modality: 0 text, 1 image)
    c.peft.contexts = configlib.context_specs(a.specs)
  c.train = dict(mode=a.mode, batch_size=a.batch_size, epochs=a.epochs, micro_steps=1, log_every=50,
                 checkpoint_every=200, max_zero_grad_steps=20,
                 export=True,  # DIR/export: the adaptor-only copy of the best weights
                 freeze_connector=False, freeze_contexts=(),
                 # mode=full: False keeps the input embedding table frozen, as the paper does
                 full_embeddings=False,
                 adaptor_dropout=0.0)  # per-token: a token loses its adaptor (the authors')
  c.eval = dict(batch_size=50, num_captions=3,  # captions the two-variant demo prints
                num_beams=1, max_new_tokens=0,  # 0: as many tokens as a training row holds
                all_references=False)  # True: validation PPL over every caption of an image
  c.optim = dict(learning_rate=6e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                 schedule='cosine', warmup_steps=a.warmup_steps, total_steps=0,
                 grad_clip_norm=1.0)
  return c


def grid() -> list[str]:
  """The paper's grid at demo scale, as arg strings: 32 cells for `python -m cpeft_jax.sweep`.

  {IA3, BitFit, LoRA r=1, 8, 64} x targets {A, F, AF} (the `targets` arg: attention,
  feed-forward or both) x contexts {agnostic, modality}, plus projection only (method=none,
  mode=connector) and full fine-tuning (mode=full). The sweep's stage 0 runs once and every
  cell loads its checkpoints.

  The demo-scale grid with two seeds (RESULTS.md):
    python -m cpeft_jax.sweep --config=configs/demo.py:epochs=1,num_train=400,warmup_steps=10 \
        --grid=paper --seeds=0,1 --workdir=DIR
  took 29 min on a quiet 2-core CPU (stage 0 about 2 min once, then 0.3-0.5 min per cell and
  seed, 125 steps each; the later seed loads its compiles from the sweep's cache).
  """
  out = [f'method={m},{f"rank={r}," if r else ""}targets={t},contexts={x}'
         for (m, r) in (('ia3', 0), ('bitfit', 0), ('lora', 1), ('lora', 8), ('lora', 64))
         for t in ('A', 'F', 'AF') for x in ('agnostic', 'modality')]
  return out + ['method=none,mode=connector,contexts=agnostic',
                'method=none,mode=full,contexts=agnostic']
