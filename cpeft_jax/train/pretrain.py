"""The demo's stage 0: pre-train its small decoder as a plain text LM on the training captions.

Context-PEFT adapts a *pre-trained* language model, and the offline demo has none to
download. This stage trains one (full fine-tuning, text only, no images) and writes it as a
Hugging Face Llama checkpoint with its tokenizer, which stage 1 then loads, frozen, through
the same loader as any real checkpoint.
"""

from __future__ import annotations

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import checkpoints
from cpeft_jax.data import layout
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.models.llama import Decoder, DecoderConfig
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib


def text_lm(config, workdir: str, split, tok, num_image_tokens: int) -> str:
  """The directory of the pre-trained text decoder (trained now unless already there).

  Its rows are as long as the caption part of stage 1's rows (seq_len - num_image_tokens).
  """
  out = os.path.join(workdir, 'base_lm')
  if os.path.exists(os.path.join(out, checkpoints.CONFIG)):
    return out
  p = config.pretrain
  model = dict(config.model, vocab_size=config.model.vocab_size or len(tok), dtype='float32',
               param_dtype='float32')
  cfg = DecoderConfig.from_dict(model)
  train_model = Decoder(cfg, deterministic=False)
  ids = tokenizer_lib.special_ids(tok)
  texts = [t for caps in split.captions for t in caps]
  tokens = tokenizer_lib.encode(tok, texts)
  seq_len = config.data.seq_len - num_image_tokens
  data = layout.layout_captions(tokens, num_image_tokens=0, seq_len=seq_len, bos_id=ids.bos,
                                eos_id=ids.eos, pad_id=ids.pad)
  keys = ('tokens', 'targets', 'attention_mask', 'loss_mask')

  def apply(variables, batch, *, train=False, rng=None):
    return train_model.apply(variables, batch['tokens'], attention_mask_BL=batch['attention_mask'],
                             rngs={'dropout': rng})

  params = Decoder(cfg).init(jax.random.key(config.seed), jnp.zeros((1, seq_len), jnp.int32))
  steps_per_epoch = len(texts) // p.batch_size
  tx = state_lib.optimizer(state_lib.OptimConfig(
      learning_rate=p.learning_rate, b1=0.9, b2=0.95, schedule='cosine',
      warmup_steps=min(50, steps_per_epoch), total_steps=steps_per_epoch * p.epochs,
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
      state, m = step(state, {}, batch, jax.random.fold_in(rng, epoch * steps_per_epoch + k))
      losses.append(m['loss'])
    loss = float(np.mean(jax.device_get(losses)))
    print(f'stage 0 (text-only pre-training of the demo decoder): epoch {epoch + 1}/{p.epochs}, '
          f'loss {loss:.4f}', flush=True)
  logging.info('writing the pre-trained demo decoder to %s', out)
  checkpoints.save_decoder(out, cfg, state.trainable['params'], tok)
  return out
