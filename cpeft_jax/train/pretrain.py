"""The demo's stage 0: pre-train its small base models, since it has none to download.

Context-PEFT adapts *pre-trained* models. `text_lm` trains the decoder as a plain text LM on
the training captions (no images) and writes a Hugging Face Llama checkpoint with its
tokenizer; `vision_encoder` trains a small CLIP vision tower on labels derived from the demo's
scenes and writes a Hugging Face CLIPVisionModel checkpoint. Stage 1 then loads both, frozen,
through the same loaders as any real checkpoint.
"""

from __future__ import annotations

import functools
import json
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpeft_jax import checkpoints, hosts
from cpeft_jax import trainable as trainable_lib
from cpeft_jax import workdir as workdir_lib
from cpeft_jax.data import layout, pipeline
from cpeft_jax.data.demo import examples as demo_examples
from cpeft_jax.data.demo import scenes
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.models import clip
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.llama import Decoder
from cpeft_jax.models.vision import ViT, ViTConfig
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib


def text_lm(config, workdir: str, split, tok, num_image_tokens: int) -> str:
  """The directory of the pre-trained text decoder (trained now unless already there).

  Its rows are as long as the caption part of stage 1's rows (seq_len - num_image_tokens).
  """
  out = os.path.join(workdir, workdir_lib.BASE_LM)
  if not os.path.exists(os.path.join(out, checkpoints.CONFIG)):  # process 0 trains, all read it
    hosts.lead_then_all(lambda: _train_text_lm(config, out, split, tok, num_image_tokens),
                        f'Stage 0 (pre-training the text decoder into {out})')
  return out


def _train_text_lm(config, out: str, split, tok, num_image_tokens: int) -> None:
  p = config.pretrain
  model = dict(config.model, vocab_size=config.model.vocab_size or len(tok), dtype='float32',
               param_dtype='float32')
  cfg = DecoderConfig.from_dict(model)
  train_model = Decoder(cfg, deterministic=False)
  ids = tokenizer_lib.special_ids(tok)
  texts = [f'{prompt} {target}' if prompt else target  # every task's texts (QA: 'q ? a')
           for task in pipeline.base_tasks(config) for pairs in split.texts(task) for prompt, target in pairs]
  tokens = tokenizer_lib.encode(tok, texts)
  seq_len = config.data.seq_len - num_image_tokens
  data = layout.layout_captions(tokens, num_image_tokens=0, seq_len=seq_len, bos_id=ids.bos,
                                eos_id=ids.eos, pad_id=ids.pad)
  keys = ('tokens', 'targets', 'attention_mask', 'loss_mask')

  def apply(variables, batch, *, train=False, rng=None):
    return train_model.apply(variables, batch['tokens'], attention_mask_BL=batch['attention_mask'],
                             rngs={'dropout': rng}, method='features')

  params = Decoder(cfg).init(jax.random.key(config.seed), jnp.zeros((1, seq_len), jnp.int32))
  frozen = {}  # the step's frozen part: a borrowed input embedding table (pretrain.embeddings)
  if p.get('embeddings'):
    params, frozen = borrowed_embeddings(params, p.embeddings)
  if not p.epochs:  # a random decoder, saved like a trained one
    checkpoints.save_decoder(out, cfg, trainable_lib.merge(params, frozen)['params'], tok)
    return
  steps_per_epoch = len(texts) // p.batch_size
  tx = state_lib.optimizer(state_lib.OptimConfig(
      learning_rate=p.learning_rate, b1=0.9, b2=0.95, schedule='cosine',
      warmup_steps=min(50, steps_per_epoch, steps_per_epoch * p.epochs - 1),
      total_steps=steps_per_epoch * p.epochs,
      grad_clip_norm=1.0))
  state = state_lib.TrainState.create(params, tx)
  step = jax.jit(functools.partial(step_lib.train_step, apply_fn=apply), donate_argnums=(0,))
  rng = jax.random.key(config.seed + 7)
  for epoch in range(p.epochs):
    order = np.random.default_rng([config.seed, 7, epoch]).permutation(len(texts))
    losses = []
    for k in range(steps_per_epoch):
      rows = order[k * p.batch_size:(k + 1) * p.batch_size]
      batch = {key: jnp.asarray(data[key][rows]) for key in keys}
      state, m = step(state, frozen, batch, jax.random.fold_in(rng, epoch * steps_per_epoch + k))
      losses.append(m['loss'])
    loss = float(np.mean(jax.device_get(losses)))
    print(f'stage 0 (text-only pre-training of the demo decoder): epoch {epoch + 1}/{p.epochs}, '
          f'loss {loss:.4f}', flush=True)
  logging.info('writing the pre-trained demo decoder to %s', out)
  checkpoints.save_decoder(out, cfg, trainable_lib.merge(state.trainable, frozen)['params'], tok)


def borrowed_embeddings(params, checkpoint: str) -> tuple[dict, dict]:
  """(`params` less the input embedding table, that table taken from another checkpoint)
  (pretrain.embeddings), as the paper's language model borrows OPT-125m's: the second part
  goes to the step as frozen, so the table has no gradient and no optimizer state."""
  table = checkpoints.input_embeddings(checkpoint)
  leaf = params['params']['embed_tokens']['embedding']
  if table.shape != leaf.shape:
    raise ValueError(f'pretrain.embeddings={checkpoint!r} has an input embedding table of shape '
                     f'{tuple(table.shape)}; the decoder to pre-train (config.model: '
                     f'vocab_size, hidden_size) needs {tuple(leaf.shape)}.')
  embed = dict(params['params']['embed_tokens'], embedding=jnp.asarray(table, leaf.dtype))
  rest = {k: v for k, v in params['params'].items() if k != 'embed_tokens'}
  return {**params, 'params': rest}, {'params': {'embed_tokens': embed}}


# ----------------------------------------------------------------------------- the vision tower

VISION_METRICS = 'base_vision_metrics.json'


# Per-patch labels: 0 is background, then 1-based indices into these (scenes.py).
PATCH_LABELS = {'shape': len(scenes.SHAPES), 'color': len(scenes.COLORS),
                'size': len(scenes.SIZES), 'group_count': scenes.MAX_COUNT}


class _Tagger(nn.Module):
  """A CLIP vision tower with the linear heads stage 0 trains it through (then dropped).

  The class token, through CLIP's post_layernorm, predicts how many shapes the image holds;
  every patch token predicts the shape, colour and size of the object drawn in it and how many
  objects its group has (0: none, for each). The captioner reads the patch tokens, so that is
  where most labels go: a caption names each group's count, size, colour and shape.
  """
  cfg: ViTConfig

  @nn.compact
  def __call__(self, pixels_BHWC) -> dict[str, jax.Array]:
    x_BTD = ViT(self.cfg, name='tower')(pixels_BHWC)
    cls_D = nn.LayerNorm(self.cfg.layer_norm_eps, name='post_layernorm')(x_BTD[:, 0])
    out = {'count': nn.Dense(scenes.GRID**2 + 1, name='count_head')(cls_D)}
    for name, classes in PATCH_LABELS.items():
      out[name] = nn.Dense(classes + 1, name=f'{name}_head')(x_BTD[:, 1:])
    return out


def vision_labels(split, images_NHW3: np.ndarray, cfg: ViTConfig, *,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Labels of a demo split's images, from the scenes they were drawn from (`scene_labels`)."""
  return scene_labels([demo_examples.scene_of(int(i), seed=seed, image_size=cfg.image_size)
                       for i in split.image_ids], images_NHW3, cfg)


def scene_labels(scene_list, images_NHW3: np.ndarray, cfg: ViTConfig) -> dict[str, np.ndarray]:
  """Labels of drawn scenes. count [n]: number of shapes; per patch (row-major) [n, N]: shape,
  color, size (1-based indices into scenes.SHAPES / COLORS / SIZES) and group_count (its
  group's count) of the object that covers most of the patch's pixels (0: background only).
  Every group of a scene has its own colour, so a pixel's exact colour names its group.
  """
  n = len(images_NHW3)
  g, P = cfg.image_size // cfg.patch_size, cfg.patch_size
  patches = images_NHW3.reshape(n, g, P, g, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, g * g, P * P, 3)
  out = {'count': np.zeros(n, np.int32),
         **{name: np.zeros((n, g * g), np.int32) for name in PATCH_LABELS}}
  colors = list(scenes.COLORS)
  for k, scene in enumerate(scene_list):
    out['count'][k] = len(scene.items)
    covered_GN = np.stack([(patches[k] == scenes.COLORS[grp.color]).all(-1).sum(-1)
                           for grp in scene.groups])  # pixels of each group in each patch
    top_N = covered_GN.argmax(0)
    drawn_N = covered_GN.max(0) > 0
    per_group = {'shape': [scenes.SHAPES.index(grp.shape) + 1 for grp in scene.groups],
                 'color': [colors.index(grp.color) + 1 for grp in scene.groups],
                 'size': [scenes.SIZES.index(grp.size) + 1 for grp in scene.groups],
                 'group_count': [grp.count for grp in scene.groups]}
    for name, values_G in per_group.items():
      out[name][k] = np.where(drawn_N, np.asarray(values_G)[top_N], 0)
  return out


def extra_scenes(num: int, *, seed: int, image_size: int):
  """`num` scenes drawn for the tower's pre-training only, from their own random stream (never
  a training, validation or test scene of the dataset): (scenes, uint8 images [num, S, S, 3])."""
  made = [scenes.sample_scene(np.random.default_rng([seed, _EXTRA_STREAM, i]), image_size)
          for i in range(num)]
  images = np.stack([scenes.draw(s) for s in made]) if made else np.zeros(
      (0, image_size, image_size, 3), np.uint8)
  return made, images


_EXTRA_STREAM = 99  # examples.py's streams are [seed, split code 0..2, index]


def _images(split, size: int) -> np.ndarray:
  """All images of a split, uint8 [n, size, size, 3]."""
  x = np.stack([split.image(i) for i in range(len(split))])
  if x.shape[1:3] != (size, size):
    raise ValueError(f'The demo images are {x.shape[1]}x{x.shape[2]}; the vision tower to '
                     f'pre-train takes {size}x{size} (pretrain.vision.image_size).')
  return x


def _normalise(images_NHW3):
  """uint8 -> [-1, 1] (the mean and std 0.5 of the saved preprocessor config)."""
  return (images_NHW3.astype(np.float32) / 255.0 - 0.5) / 0.5


def vision_config(config) -> ViTConfig:
  """The CLIP tower of config.pretrain.vision, as the loader will rebuild it from config.json."""
  v = config.pretrain.vision
  return clip.config_from_hf(dict(
      model_type='clip_vision_model', image_size=v.image_size, patch_size=v.patch_size,
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
      num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads), drop_cls=False)


def vision_encoder(config, workdir: str, split, eval_split=None) -> str:
  """The directory of the demo's pre-trained vision tower (trained now unless already there).

  A small CLIP vision tower learns the labels (see `_Tagger`) of the training images and of
  config.pretrain.vision.extra_scenes more scenes drawn for it alone (`extra_scenes`) for
  config.pretrain.vision.epochs, then is written as a Hugging Face CLIPVisionModel checkpoint
  with its preprocessor_config.json, to be loaded frozen like any real one. Label accuracies
  on `eval_split` (and the majority-class rates they should beat) go to base_vision_metrics.json.
  """
  out = os.path.join(workdir, workdir_lib.BASE_VISION)
  if not os.path.exists(os.path.join(out, checkpoints.CONFIG)):  # process 0 trains, all read it
    hosts.lead_then_all(lambda: _train_vision(config, workdir, split, eval_split),
                        f'Stage 0 (pre-training the vision tower into {out})')
  return out


def _train_vision(config, workdir: str, split, eval_split) -> None:
  import transformers
  out = os.path.join(workdir, workdir_lib.BASE_VISION)
  v = config.pretrain.vision
  cfg = vision_config(config)
  seed = config.data.demo.get('seed', 0)
  images = _images(split, cfg.image_size)
  y = vision_labels(split, images, cfg, seed=seed)
  if v.get('extra_scenes', 0):  # more scenes than the captioned ones, for the tower alone
    more, more_images = extra_scenes(v.extra_scenes, seed=seed, image_size=cfg.image_size)
    y_more = scene_labels(more, more_images, cfg)
    images = np.concatenate([images, more_images])
    y = {k: np.concatenate([y[k], y_more[k]]) for k in y}
  x = _normalise(images)
  model = _Tagger(cfg)
  params = model.init(jax.random.key(config.seed + 11), x[:1])['params']
  steps_per_epoch = max(len(x) // v.batch_size, 1)
  total = steps_per_epoch * v.epochs
  tx = state_lib.optimizer(state_lib.OptimConfig(
      learning_rate=v.learning_rate, b1=0.9, b2=0.95, schedule='cosine' if total > 1 else
      'constant', warmup_steps=min(20, max(total - 1, 0)), total_steps=total, grad_clip_norm=1.0))
  opt_state = tx.init(params)

  def loss_fn(params, x_BHWC, labels):
    logits = model.apply({'params': params}, x_BHWC)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return sum(ce(logits[k], labels[k]).mean() for k in logits)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, x_BHWC, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, x_BHWC, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for epoch in range(v.epochs):
    order = np.random.default_rng([config.seed, 11, epoch]).permutation(len(x))
    losses = []
    for k in range(steps_per_epoch):
      rows = order[k * v.batch_size:(k + 1) * v.batch_size]
      params, opt_state, loss = step(params, opt_state, x[rows],
                                     {key: val[rows] for key, val in y.items()})
      losses.append(loss)
    print(f'stage 0 (label pre-training of the demo vision tower): epoch {epoch + 1}/{v.epochs}, '
          f'loss {float(np.mean(jax.device_get(losses))):.4f}', flush=True)

  metrics = {'epochs': v.epochs, 'train_images': len(x)}
  if eval_split is not None and v.epochs:
    metrics.update(label_accuracy(model, params, eval_split, cfg, seed=seed, train_labels=y))
    print('stage 0 vision tower, validation label accuracy (majority-class rate): ' + ', '.join(
        f'{k} {metrics[k]:.3f} ({metrics[k + "_majority"]:.3f})' for k in ('count', *PATCH_LABELS)
    ) + '; on patches showing an object: ' + ', '.join(
        f'{k} {metrics[k + "_object"]:.3f}' for k in PATCH_LABELS), flush=True)
  # The Pillow variant where transformers has one: the default one asks for torchvision.
  processor = (getattr(transformers, 'CLIPImageProcessorPil', None) or
               transformers.CLIPImageProcessor)(
      size={'shortest_edge': cfg.image_size},
      crop_size={'height': cfg.image_size, 'width': cfg.image_size},
      image_mean=[0.5] * 3, image_std=[0.5] * 3)
  norm = params['post_layernorm']
  logging.info('writing the pre-trained demo vision tower to %s', out)
  checkpoints.save_vision(
      out, cfg, params['tower'], processor=processor,
      extra={'post_layernorm.weight': norm['scale'], 'post_layernorm.bias': norm['bias']})
  with open(os.path.join(workdir, VISION_METRICS), 'w') as f:
    json.dump(metrics, f, indent=2)


def label_accuracy(model, params, split, cfg: ViTConfig, *, seed: int = 0,
                   train_labels=None) -> dict[str, float]:
  """Accuracy of each head on a split, and the rate of always answering the majority class
  (of `train_labels` when given, else of the split itself): chance level to beat."""
  images = _images(split, cfg.image_size)
  x, y = _normalise(images), vision_labels(split, images, cfg, seed=seed)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x))
  preds = {}
  for k in range(0, len(x), 100):
    for name, logits in apply(params, x[k:k + 100]).items():
      preds.setdefault(name, []).append(np.asarray(jnp.argmax(logits, -1)))
  ref = train_labels or y
  on_object = y['color'] > 0
  metrics = {}
  for name, pred in preds.items():
    pred = np.concatenate(pred)
    metrics[name] = float(np.mean(pred == y[name]))
    majority = np.bincount(ref[name].reshape(-1)).argmax()
    metrics[name + '_majority'] = float(np.mean(y[name] == majority))
    if name in PATCH_LABELS:
      metrics[name + '_object'] = float(np.mean((pred == y[name])[on_object]))
  return metrics
