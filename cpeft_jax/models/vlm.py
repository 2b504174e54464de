"""Frozen vision encoder -> connector -> spliced into the decoder's input embeddings -> decoder.

The sequence layout (cpeft_jax.data.layout) marks each position with a token kind: image
positions receive the projected image embeddings in order, boundary positions the connector's
learned (open, close) vectors, every other position its token's embedding. Context ids come
with the batch, so a new kind of context needs no change here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.contexts import Kind
from cpeft_jax.models.connector import Connector, ConnectorConfig
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.models.decoder_config import DTYPES, DecoderConfig

def splice(text_BLD, image_BND, kinds_BL, boundary_2D=None):
  """Puts image embeddings (in order) at IMAGE positions and boundary vectors at BOUNDARY ones.

  The first BOUNDARY position of a row gets the open vector, the next the close vector.
  """
  image_mask = kinds_BL == Kind.IMAGE
  idx_BL = jnp.clip(jnp.cumsum(image_mask, 1) - 1, 0, image_BND.shape[1] - 1)
  picked = jnp.take_along_axis(image_BND.astype(text_BLD.dtype), idx_BL[..., None], axis=1)
  x_BLD = jnp.where(image_mask[..., None], picked, text_BLD)
  if boundary_2D is not None:
    bmask = kinds_BL == Kind.BOUNDARY
    which_BL = jnp.clip(jnp.cumsum(bmask, 1) - 1, 0, 1)
    x_BLD = jnp.where(bmask[..., None], boundary_2D.astype(x_BLD.dtype)[which_BL], x_BLD)
  return x_BLD

class VisionLanguageModel(nn.Module):
  """A captioning model: pixels + laid-out tokens + context ids in, logits out.

  Variables: 'params' holds encoder (frozen), connector (trained) and decoder (frozen unless
  the config trains it); 'adaptors' holds the decoder's per-context tables.
  """
  encoder: nn.Module  # pixels [B, H, W, C] -> features [B, N, Dv]
  decoder_cfg: DecoderConfig
  peft: PeftConfig | None = None
  connector_cfg: ConnectorConfig = ConnectorConfig()
  train_encoder: bool = False
  deterministic: bool = True

  def setup(self):
    self.connector = Connector(self.connector_cfg, self.decoder_cfg.hidden_size,
                               dtype=DTYPES[self.decoder_cfg.dtype],
                               deterministic=self.deterministic)
    self.decoder = make_decoder(self.decoder_cfg, self.peft, self.deterministic)

  def image_embeddings(self, pixels_BHWC):
    feats_BNV = self.encoder(pixels_BHWC)
    if not self.train_encoder:
      feats_BNV = jax.lax.stop_gradient(feats_BNV)
    return self.connector(feats_BNV)

  def __call__(self, pixels_BHWC, tokens_BL, kinds_BL, context_ids_BL, attention_mask_BL=None,
               return_hidden=False, cache=None, logits_to_keep=0):
    """Logits [B, L, vocab]; with a decoder `KVCache` (to prefill a prompt), (logits, cache).
    logits_to_keep=k > 0: only the last k positions' (see `Decoder`)."""
    image_BND = self.image_embeddings(pixels_BHWC)
    if not isinstance(kinds_BL, jax.core.Tracer):
      counts = np.asarray(kinds_BL == Kind.IMAGE).sum(1)
      if np.any(counts != image_BND.shape[1]):
        raise ValueError(f'The layout has {sorted(set(counts.tolist()))} image positions per row '
                         f'but the encoder gives {image_BND.shape[1]} image embeddings; set the '
                         f"layout's num_image_tokens to {image_BND.shape[1]}.")
    boundary = self.connector.boundary() if self.connector_cfg.boundary_tokens else None
    x_BLD = splice(self.decoder.embed(tokens_BL), image_BND, kinds_BL, boundary)
    return self.decoder(embeddings_BLD=x_BLD, context_ids_BL=context_ids_BL,
                        attention_mask_BL=attention_mask_BL, return_hidden=return_hidden,
                        cache=cache, logits_to_keep=logits_to_keep)

  def features(self, pixels_BHWC, tokens_BL, kinds_BL, context_ids_BL, attention_mask_BL=None):
    """(final hidden states [B, L, D], the decoder's `LMHead`): the logits' factors, for the
    chunked loss (cpeft_jax/losses.py), which never makes all [B, L, vocab] of them."""
    hidden_BLD = self(pixels_BHWC, tokens_BL, kinds_BL, context_ids_BL, attention_mask_BL,
                      return_hidden=True)
    return hidden_BLD, self.decoder.output_head()

  def decode(self, tokens_BL, context_ids_BL, cache, positions_BL=None):
    """Text tokens after a prefilled prompt (generation steps): (logits, updated cache)."""
    return self.decoder(tokens_BL, context_ids_BL=context_ids_BL, positions_BL=positions_BL,
                        cache=cache)


ADAPTOR_DROPOUT_STREAM = 1  # folded into the step's rng: the adaptor-dropout mask's own key


def drop_contexts(context_ids_BL, rate: float, rng, num_contexts: int):
  """Per-token adaptor dropout (the authors' adaptor_dropout on the context mask): each token
  loses its adaptor with probability `rate` and runs through the frozen base alone, its id set
  to `num_contexts`, which routes to no table (under jit: concrete ids out of range are
  refused by the decoder's check). Nothing is rescaled: the mask is 0 or 1, as theirs."""
  keep_BL = jax.random.bernoulli(rng, 1.0 - rate, context_ids_BL.shape)
  return jnp.where(keep_BL, context_ids_BL, num_contexts).astype(context_ids_BL.dtype)


def apply_fn(model: VisionLanguageModel, adaptor_dropout: float = 0.0, *,
             logits: bool = False):
  """(variables, batch, *, train, rng) -> (hidden [B, L, D], LMHead), the loss's input in the
  train and eval steps (cpeft_jax/losses.py); with `logits`, the logits [B, L, V] instead.

  adaptor_dropout (config: train.adaptor_dropout): training drops each token's adaptor with
  this probability (`drop_contexts`); evaluation never does.
  """
  method = None if logits else VisionLanguageModel.features
  train_model = model.clone(deterministic=False)
  drop = adaptor_dropout > 0 and model.peft is not None and bool(model.peft.methods)

  def apply(variables, batch, *, train=False, rng=None):
    m = train_model if train else model
    ids_BL = batch['context_ids']
    if train and drop:
      ids_BL = drop_contexts(ids_BL, adaptor_dropout,
                             jax.random.fold_in(rng, ADAPTOR_DROPOUT_STREAM),
                             model.peft.num_contexts)
    return m.apply(variables, batch['pixels'], batch['tokens'], batch['kinds'], ids_BL,
                   batch['attention_mask'], rngs={'dropout': rng} if train else None,
                   method=method)
  return apply
