"""Merged checkpoints: a context's adaptors folded into the frozen weights.

`merged_params` folds context c's adaptors into the base (W' = diag(ia3_in) W diag(ia3_out)
+ s A_c B_c, with DoRA's column scaling) for inference without adaptors, and `save_merged`
writes that as a plain Hugging Face checkpoint (checkpoints.save_decoder) of the base's family.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

from cpeft_jax import adaptors, checkpoints, trees
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig


def merged_params(params, tables, cfg: DecoderConfig, peft: PeftConfig, context: int = 0):
  """The frozen 'params' with context `context`'s adaptors folded in (a plain decoder's).

  For every adapted projection, with D = s A_c B_c and DoRA's g = m_c / ||W + D||_col (1
  without DoRA),

    W' = diag(ia3_in) W diag(g * ia3_out) + D diag(g),   b' = b * ia3_out + bitfit_c,

  which is exactly ContextDense's function for tokens of context `context` (the low-rank
  branch reads the unscaled input and adds after IA3; DoRA leaves the bias unscaled).
  BitFit needs a bias to fold into: on a bias-free projection it is an error.
  """
  methods, lo = peft.context_spec(context)
  row = peft.row_of(context)
  flat_p = {k: np.asarray(v, np.float32) for k, v in trees.flatten(params).items()}
  flat_t = trees.flatten(tables)
  targets = adaptors.resolve_targets(peft, cfg.projections())
  for path, adapt in targets.items():
    if not adapt.any:
      continue
    base = f'layers/{path}'
    w_NDE = kernel_NDE = flat_p[f'{base}/kernel']
    table = lambda name: np.asarray(flat_t[f'{base}/{name}'][:, row], np.float32)
    bias_NE = flat_p.get(f'{base}/bias')
    # Rows of methods this context lacks are inert in the layer (masked), so skipped here.
    dora = getattr(adapt, 'dora', False) and 'dora' in methods
    delta_NDE = None
    if (adapt.lora and 'lora' in methods) or dora:
      r = lo.rank
      delta_NDE = lo.scale * np.einsum('ndr,nre->nde', table('lora_a')[..., :r],
                                       table('lora_b')[:, :r])
    g_NE = np.ones(w_NDE[:, 0].shape, np.float32)
    if dora:
      g_NE = table('dora_m') / np.sqrt(((kernel_NDE + delta_NDE) ** 2).sum(axis=1))
    ia3 = adapt.ia3 if 'ia3' in methods else None
    if ia3 == 'in':
      w_NDE = w_NDE * table('ia3')[:, :, None]
    w_NDE = w_NDE * g_NE[:, None, :]
    if ia3 == 'out':
      s_NE = table('ia3')
      w_NDE = w_NDE * s_NE[:, None, :]
      bias_NE = None if bias_NE is None else bias_NE * s_NE
    if adapt.bitfit and 'bitfit' in methods:
      if bias_NE is None:
        raise ValueError(f'BitFit on {path} cannot be merged: the projection has no bias in a '
                         'plain checkpoint (only q/k/v biases exist, with qkv_bias).')
      bias_NE = bias_NE + table('bitfit')
    if delta_NDE is not None:
      w_NDE = w_NDE + delta_NDE * g_NE[:, None, :]
    flat_p[f'{base}/kernel'] = w_NDE
    if bias_NE is not None:
      flat_p[f'{base}/bias'] = bias_NE
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  return trees.unflatten({k: jax.numpy.asarray(v, dtype) for k, v in flat_p.items()})


def merged_per_context(params, tables, cfg: DecoderConfig, peft: PeftConfig) -> dict[int, dict]:
  """{context: merged params} for every adapted context (one plain decoder per context)."""
  return {c: merged_params(params, tables, cfg, peft, c) for c in peft.rows}


def save_merged(directory: str | os.PathLike, params, tables, cfg: DecoderConfig,
                peft: PeftConfig, context: int = 0, tokenizer=None) -> pathlib.Path:
  """A plain Hugging Face checkpoint (Llama, GPT-2 or OPT, as the base) of the model as
  context `context`'s tokens see it."""
  return checkpoints.save_decoder(directory, cfg, merged_params(params, tables, cfg, peft,
                                                                context), tokenizer)
