"""Tokenizers through transformers: a checkpoint's own, or a word-level one for the demo data.

The demo has no checkpoint to take a tokenizer from, so one is built from its captions'
vocabulary with the `tokenizers` library and saved like any other (save_pretrained), so that
evaluation reloads exactly the same one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import tokenizers
import transformers

SPECIALS = ('[PAD]', '[BOS]', '[EOS]', '[UNK]')


class SpecialIds(NamedTuple):
  bos: int
  eos: int
  pad: int


def word_level(texts: Iterable[str]) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer over the words of `texts` (lower-cased, punctuation split off)."""
  pre = tokenizers.pre_tokenizers.Whitespace()
  words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())})
  vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(words))}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
  tok.normalizer = tokenizers.normalizers.Lowercase()
  tok.pre_tokenizer = pre
  tok.decoder = tokenizers.decoders.WordPiece(prefix='##')  # joins words with spaces
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='[PAD]', bos_token='[BOS]', eos_token='[EOS]',
      unk_token='[UNK]')


def load(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
  """AutoTokenizer from a local directory or a hub id in the local cache."""
  try:
    return transformers.AutoTokenizer.from_pretrained(name_or_path)
  except OSError as e:
    raise FileNotFoundError(f'No tokenizer at {name_or_path!r} (a local directory or a hub id '
                            f'in the local Hugging Face cache was expected): {e}') from None


def special_ids(tok: transformers.PreTrainedTokenizerBase) -> SpecialIds:
  """BOS, EOS and PAD ids; PAD falls back to EOS (as Llama tokenizers have no PAD)."""
  if tok.bos_token_id is None or tok.eos_token_id is None:
    raise ValueError(f'Tokenizer {tok.name_or_path!r} has no BOS or EOS token '
                     f'(bos={tok.bos_token!r}, eos={tok.eos_token!r}); the caption layout '
                     'needs both.')
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  return SpecialIds(tok.bos_token_id, tok.eos_token_id, pad)


def encode(tok: transformers.PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
  """Token ids of each text, without special tokens (the layout adds BOS and EOS)."""
  return tok(texts, add_special_tokens=False)['input_ids']
