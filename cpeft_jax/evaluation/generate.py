"""Caption generation under jit: greedy and beam search over a static-shape key/value cache.

The prompt (for the vision-language model: the layout's prefix, [BOS] (+ boundaries) + image
positions) is run once to fill a `KVCache`; then one token per step is fed back under
`lax.while_loop`, which stops when every row has ended. Generated tokens are text tokens: they
use the adaptor context the caller names (`text_context`, e.g. 0 under the 'modality' map).
Outputs are token ids [B, max_new_tokens], with `pad_id` after a row's EOS.

Beam search keeps batch * num_beams cache rows and reorders them by each surviving beam's
origin every step. A hypothesis ending in EOS is scored sum(log p) / length ** length_penalty
(length counts the generated tokens, EOS included; as transformers, an EOS candidate is kept
only if it ranks within the beam width). A row stops once no live beam can beat its best
finished hypothesis, so with length_penalty=0 and one beam the search is exactly greedy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax

import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import lowp
from cpeft_jax.contexts import Kind
from cpeft_jax.models.attention import KVCache
from cpeft_jax.models.llama import Decoder
from cpeft_jax.models.vlm import VisionLanguageModel

PROMPT_KINDS = (Kind.BOS, Kind.IMAGE, Kind.BOUNDARY)
NEG = -1e9  # the score of an empty beam or hypothesis; far below any real log-probability


def prompt_length(kinds_BL) -> int:
  """Length of the layout's prefix (BOS, image, boundary positions), the same in every row."""
  kinds_BL = np.asarray(kinds_BL)
  in_prompt = np.isin(kinds_BL, PROMPT_KINDS)
  lengths = np.where(in_prompt.all(1), kinds_BL.shape[1], np.argmin(in_prompt, 1))
  if lengths.size == 0 or len(set(lengths.tolist())) != 1 or lengths[0] == 0:
    raise ValueError(f'The rows of the batch have prompt (BOS/image/boundary prefix) lengths '
                     f'{sorted(set(lengths.tolist()))}; generation expects one common length >= 1.')
  return int(lengths[0])


def generate(model: VisionLanguageModel, variables, batch: Mapping[str, np.ndarray], *,
             max_new_tokens: int, eos_id: int, text_context: int, pad_id: int = 0,
             num_beams: int = 1, length_penalty: float = 1.0,
             prompt_len: int | None = None) -> jax.Array:
  """Captions [B, max_new_tokens] for a laid-out batch (pixels, tokens, kinds, context_ids).

  Only the prompt prefix of tokens/kinds/context_ids is read (captions after it are ignored).
  Greedy with num_beams=1, beam search otherwise. `prompt_len`: the prefix length when the
  batch is global arrays of several hosts (else read from its kinds).
  """
  P = prompt_len or prompt_length(batch['kinds'])
  check_request(model.decoder_cfg.vocab_size, model.peft, max_new_tokens, eos_id, pad_id,
                text_context, num_beams)
  run = _vlm_generator(model, P, max_new_tokens, eos_id, pad_id, num_beams, float(length_penalty))
  return run(variables, jnp.asarray(batch['pixels']), jnp.asarray(batch['tokens'])[:, :P],
             jnp.asarray(batch['kinds'])[:, :P], jnp.asarray(batch['context_ids'])[:, :P],
             jnp.asarray(text_context, jnp.int32))


def generate_text(model: Decoder, variables, tokens_BP, *, max_new_tokens: int, eos_id: int,
                  text_context: int, context_ids_BP=None, attention_mask_BP=None,
                  pad_id: int = 0, num_beams: int = 1, length_penalty: float = 1.0) -> jax.Array:
  """Continuations [B, max_new_tokens] of left-padded text prompts with the bare decoder.

  Positions count only the prompt's non-padding tokens (as transformers with left padding).
  """
  tokens_BP = np.asarray(tokens_BP)
  mask_BP = (np.ones(tokens_BP.shape, bool) if attention_mask_BP is None
             else np.asarray(attention_mask_BP, bool))
  if mask_BP.shape != tokens_BP.shape or not np.all(mask_BP[:, -1]) or np.any(
      mask_BP[:, 1:] < mask_BP[:, :-1]):
    raise ValueError('attention_mask_BP must have the prompt shape and pad on the left only '
                     f'(each row False..False True..True); got\n{mask_BP}')
  ctx_BP = np.zeros(tokens_BP.shape, np.int32) if context_ids_BP is None else context_ids_BP
  check_request(model.cfg.vocab_size, model.peft, max_new_tokens, eos_id, pad_id, text_context,
                num_beams)
  run = _text_generator(model, max_new_tokens, eos_id, pad_id, num_beams, float(length_penalty))
  return run(variables, jnp.asarray(tokens_BP, jnp.int32), jnp.asarray(ctx_BP, jnp.int32),
             jnp.asarray(mask_BP), jnp.asarray(text_context, jnp.int32))


def check_request(vocab_size, peft, max_new_tokens, eos_id, pad_id, text_context, num_beams):
  num_contexts = peft.num_contexts if peft is not None else 1
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be a positive int, got {max_new_tokens!r}.')
  if not isinstance(num_beams, int) or num_beams < 1:
    raise ValueError(f'num_beams must be a positive int, got {num_beams!r}.')
  for name, value in (('eos_id', eos_id), ('pad_id', pad_id)):
    if not 0 <= value < vocab_size:
      raise ValueError(f'{name}={value} is outside the vocabulary [0, {vocab_size}).')
  if not 0 <= text_context < num_contexts:
    raise ValueError(f'text_context={text_context} is not a context of the model '
                     f'(valid ids are 0..{num_contexts - 1}).')


def unrolled(cfg):
  """The decoder config of generation (prefill and steps), run through `stepper`."""
  return dataclasses.replace(cfg, unroll_layers=True)


@flax.struct.dataclass
class DecodeWeights:
  """A model's variables laid out for decoding (`prepare`): what every prefill and one-token step
  reads, made once.

  - `layers`: the decoder's layer stacks (at `path` in every collection) cut into per-layer
    trees. A step stacks them again, which XLA folds away against each layer's static slice,
    so no step copies a weight. (XLA does not hoist static slices of a stack out of a loop, and
    a layer loop's dynamic slices copy them every step: a memory-bound one-token step would read
    every weight twice; bench/: paper shape, float32, 1.6x faster generation.)
  - Frozen float kernels of the layers and the untied LM head stored output-major
    (`lowp.OutputMajorKernel`), the layout a one-token step multiplies fastest on XLA:CPU, as
    torch's nn.Linear keeps them; not with DoRA, whose column norms read the kernel.
  - `variables`: everything else, as given (the stacks' place left empty).

  Building it reads and writes every weight once (a fraction of a second at the paper's shape),
  so a loop over batches (evaluation, the benchmark) prepares once and passes it to `generate`
  or `generate_text` in place of the variables; given plain variables they prepare inside.
  """
  variables: Any
  layers: Any
  path: tuple[str, ...] = flax.struct.field(pytree_node=False)


def prepare(model: Decoder | VisionLanguageModel, variables) -> DecodeWeights:
  """`variables` of `model` laid out for decoding (`DecodeWeights`), computed once under jit."""
  if isinstance(variables, DecodeWeights):
    return variables
  return _prepare_jit(*_layer_path(model))(variables)


def layout(model: Decoder | VisionLanguageModel, variables) -> DecodeWeights:
  """`prepare` without its own jit: for use inside a jitted function."""
  path, num_layers = _layer_path(model)
  return _layout(variables, path=path, num_layers=num_layers)


def _layer_path(model) -> tuple[tuple[str, ...], int]:
  if isinstance(model, VisionLanguageModel):
    return ('decoder', 'layers'), model.decoder_cfg.num_layers
  return ('layers',), model.cfg.num_layers


@functools.lru_cache(maxsize=16)
def _prepare_jit(path, num_layers):
  return jax.jit(functools.partial(_layout, path=path, num_layers=num_layers))


def _at(tree, keys):
  for key in keys:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _put(tree, keys, value):
  return value if not keys else {**tree, keys[0]: _put(tree[keys[0]], keys[1:], value)}


def _layout(variables, *, path, num_layers) -> DecodeWeights:
  if isinstance(variables, DecodeWeights):
    return variables
  adaptors = jax.tree_util.tree_flatten_with_path(variables.get('adaptors', {}))[0]
  dora = any('dora_m' in jax.tree_util.keystr(p) for p, _ in adaptors)

  def output_major(kernel):  # a frozen float kernel (not a quantized one), DoRA aside
    if dora or not isinstance(kernel, jax.Array) or not jnp.issubdtype(kernel.dtype, jnp.floating):
      return kernel
    return lowp.OutputMajorKernel.of(kernel)

  def layer_kernels(key_path, x):
    return output_major(x) if getattr(key_path[-1], 'key', None) == 'kernel' else x

  layers, rest = {}, dict(variables)
  for col, tree in variables.items():
    stacked = _at(tree, path)
    if stacked is None:
      continue
    layers[col] = tuple(jax.tree_util.tree_map_with_path(layer_kernels, jax.tree.map(
        lambda x, i=i: x[i], stacked)) for i in range(num_layers))
    rest[col] = _put(tree, path, None)
  head = path[:-1] + ('lm_head', 'kernel')
  kernel = _at(rest.get('params', {}), head)
  if kernel is not None:
    rest['params'] = _put(rest['params'], head, output_major(kernel))
  return DecodeWeights(rest, layers, tuple(path))


def stepper(apply, weights: DecodeWeights):
  """apply(variables, *args, cache=..., **kw) -> (logits, cache), made for a prefill and the
  one-token steps of a decoding loop whose state holds the cache per layer
  (`KVCache.per_layer`). `apply` runs an unrolled decoder (`unrolled`) on `weights`' layers,
  stacked again in each call (see `DecodeWeights`); the cache likewise, so it is never copied.
  """
  def step(*args, cache, **kw):
    rebuilt = {col: _put(tree, weights.path, jax.tree.map(lambda *xs: jnp.stack(xs),
                                                          *weights.layers[col]))
               if col in weights.layers else tree for col, tree in weights.variables.items()}
    logits, cache = apply(rebuilt, *args, cache=cache, **kw)  # the decoder stacks the cache
    return logits, cache.per_layer()
  return step


@functools.lru_cache(maxsize=16)
def _vlm_generator(model, prompt_len, max_new_tokens, eos_id, pad_id, num_beams, length_penalty):
  model = model.clone(decoder_cfg=unrolled(model.decoder_cfg))

  @jax.jit
  def run(variables, pixels, tokens_BP, kinds_BP, ctx_BP, text_context):
    B = tokens_BP.shape[0]
    cache = KVCache.create(model.decoder_cfg, B, prompt_len + max_new_tokens - 1)
    prefill = stepper(model.apply, layout(model, variables))
    logits_B1V, cache = prefill(pixels, tokens_BP, kinds_BP, ctx_BP, cache=cache,
                                logits_to_keep=1)
    decode = functools.partial(prefill, method=VisionLanguageModel.decode)

    def step(tokens_B, positions_B, cache):
      logits, cache = decode(tokens_B[:, None], jnp.full_like(tokens_B, text_context)[:, None],
                             cache=cache, positions_BL=positions_B[:, None])
      return logits[:, 0], cache
    positions_B = jnp.full((B,), prompt_len, jnp.int32)
    return search(step, logits_B1V[:, -1], cache, positions_B, max_new_tokens, eos_id, pad_id,
                   num_beams, length_penalty)
  return run


@functools.lru_cache(maxsize=16)
def _text_generator(model, max_new_tokens, eos_id, pad_id, num_beams, length_penalty):
  model = model.clone(cfg=unrolled(model.cfg))

  @jax.jit
  def run(variables, tokens_BP, ctx_BP, mask_BP, text_context):
    B, P = tokens_BP.shape
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, 1) - 1, 0).astype(jnp.int32)
    cache = KVCache.create(model.cfg, B, P + max_new_tokens - 1)
    apply = stepper(model.apply, layout(model, variables))
    logits_B1V, cache = apply(tokens_BP, context_ids_BL=ctx_BP, attention_mask_BL=mask_BP,
                              positions_BL=positions_BP, cache=cache, logits_to_keep=1)

    def step(tokens_B, positions_B, cache):
      logits, cache = apply(tokens_B[:, None],
                            context_ids_BL=jnp.full_like(tokens_B, text_context)[:, None],
                            positions_BL=positions_B[:, None], cache=cache)
      return logits[:, 0], cache
    return search(step, logits_B1V[:, -1], cache, positions_BP[:, -1] + 1, max_new_tokens,
                   eos_id, pad_id, num_beams, length_penalty)
  return run


def search(step, logits_BV, cache, positions_B, T, eos_id, pad_id, num_beams, length_penalty):
  """step(tokens_B, positions_B, cache) -> (logits_BV, cache) feeds one token per row; the
  cache it gets and gives is per layer (`KVCache.per_layer`, see `stepper`)."""
  cache = cache.per_layer()
  if num_beams == 1:
    return _greedy(step, logits_BV, cache, positions_B, T, eos_id, pad_id)
  return _beam(step, logits_BV, cache, positions_B, T, eos_id, pad_id, num_beams, length_penalty)


def argmax(x_BV) -> jax.Array:
  """jnp.argmax over the last axis (the first maximum; the first NaN where there is one), int32,
  as a max and then a min over the positions that hold it: XLA:CPU reduces argmax's (value,
  index) pairs several times slower (bench/: float32 [8, 50272], once per generated token,
  0.98 -> 0.30 ms)."""
  top = x_BV.max(-1, keepdims=True)
  position = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
  return jnp.min(jnp.where((x_BV == top) | jnp.isnan(x_BV), position, x_BV.shape[-1]), -1)


def _greedy(step, logits_BV, cache, positions_B, T, eos_id, pad_id):
  B = logits_BV.shape[0]

  def pick(t, out_BT, done_B, logits_BV):
    tok_B = jnp.where(done_B, pad_id, argmax(logits_BV))
    return out_BT.at[:, t].set(tok_B), done_B | (tok_B == eos_id), tok_B

  def body(state):
    t, out_BT, done_B, tok_B, cache = state
    logits_BV, cache = step(tok_B, positions_B + t - 1, cache)  # token t-1 sits at pos + t-1
    return (t + 1, *pick(t, out_BT, done_B, logits_BV), cache)

  out_BT, done_B, tok_B = pick(0, jnp.full((B, T), pad_id, jnp.int32), jnp.zeros((B,), bool),
                               logits_BV)
  state = jax.lax.while_loop(lambda s: (s[0] < T) & ~jnp.all(s[2]), body,
                             (jnp.asarray(1), out_BT, done_B, tok_B, cache))
  return state[1]


def _beam(step, logits_BV, cache, positions_B, T, eos_id, pad_id, K, alpha):
  B, V = logits_BV.shape
  length_norm = lambda n: jnp.asarray(n, jnp.float32) ** alpha
  b_B = jnp.arange(B)

  def select(t, state, logits_BKV):
    alive_BKT, alive_BK, fin_BT, fin_B, done_B = state
    score_BKV = jax.nn.log_softmax(logits_BKV, -1) + alive_BK[:, :, None]
    # 2K candidates: at most K of them (one per beam) end in EOS, so K stay alive.
    score_BC, idx_BC = jax.lax.top_k(score_BKV.reshape(B, K * V), 2 * K)
    beam_BC, tok_BC = idx_BC // V, (idx_BC % V).astype(jnp.int32)
    seq_BCT = jnp.take_along_axis(alive_BKT, beam_BC[:, :, None], 1).at[:, :, t].set(tok_BC)
    eos_BC = tok_BC == eos_id
    ended_BC = jnp.where(eos_BC & (jnp.arange(2 * K) < K), score_BC / length_norm(t + 1), NEG)
    best_B = jnp.argmax(ended_BC, 1)
    better_B = (ended_BC[b_B, best_B] > fin_B) & ~done_B
    fin_BT = jnp.where(better_B[:, None], seq_BCT[b_B, best_B], fin_BT)
    fin_B = jnp.where(better_B, ended_BC[b_B, best_B], fin_B)
    alive_BK, pick_BK = jax.lax.top_k(jnp.where(eos_BC, NEG, score_BC), K)
    alive_BKT = jnp.take_along_axis(seq_BCT, pick_BK[:, :, None], 1)
    beam_BK = jnp.take_along_axis(beam_BC, pick_BK, 1)
    tok_BK = jnp.take_along_axis(tok_BC, pick_BK, 1)
    # Log-probabilities only fall, so a live beam can at best keep its sum, normalised by the
    # most favourable length still ahead (t+1 .. T): a row whose best finished hypothesis
    # reaches that bound is done.
    best_alive_B = alive_BK[:, 0]
    bound_B = jnp.maximum(best_alive_B / length_norm(t + 1), best_alive_B / length_norm(T))
    done_B = done_B | (fin_B >= bound_B)
    return (alive_BKT, alive_BK, fin_BT, fin_B, done_B), beam_BK, tok_BK

  def body(s):
    t, state, beam_BK, tok_BK, cache = s
    cache = cache.take((b_B[:, None] * K + beam_BK).reshape(-1))
    logits_NV, cache = step(tok_BK.reshape(-1), pos_N + t - 1, cache)
    state, beam_BK, tok_BK = select(t, state, logits_NV.reshape(B, K, V))
    return t + 1, state, beam_BK, tok_BK, cache

  pos_N = jnp.repeat(positions_B, K)
  cache = cache.take(jnp.repeat(b_B, K))
  alive_BK = jnp.full((B, K), NEG, jnp.float32).at[:, 0].set(0.0)  # K copies of one prompt
  state = (jnp.full((B, K, T), pad_id, jnp.int32), alive_BK, jnp.full((B, T), pad_id, jnp.int32),
           jnp.full((B,), NEG, jnp.float32), jnp.zeros((B,), bool))
  state, beam_BK, tok_BK = select(0, state, jnp.broadcast_to(logits_BV[:, None], (B, K, V)))
  _, state, _, _, _ = jax.lax.while_loop(lambda s: (s[0] < T) & ~jnp.all(s[1][4]), body,
                                         (jnp.asarray(1), state, beam_BK, tok_BK, cache))
  alive_BKT, _, fin_BT, _, done_B = state
  # A row still running after step T-1 has a live beam scoring above every finished one.
  return jnp.where(done_B[:, None], fin_BT, alive_BKT[:, 0])
