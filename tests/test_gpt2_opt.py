"""GPT-2 and OPT decoders against transformers' PyTorch models, loaded from save_pretrained.

Three tiny random checkpoints (conftest.py's gpt_opt): GPT-2, OPT with word_embed_proj_dim !=
hidden_size (project_in/out) and OPT with do_layer_norm_before=false (post-norm, OPT-350m's
layout). The per-token context-LoRA reference adds each token's LoRA delta inside transformers' own modules
(forward hooks on c_attn, q_proj, fc1, ...), so it shares no code with the Flax model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from cpeft_jax import adaptors, checkpoints  # noqa: E402
from cpeft_jax.adaptors import PeftConfig  # noqa: E402
from cpeft_jax.evaluation.generate import generate_text  # noqa: E402
from cpeft_jax.models import attention, decoder_config, hf_configs, llama  # noqa: E402
from cpeft_jax.models.decoders import make_decoder  # noqa: E402
from helpers import GPT_OPT_PEFT, GPT_TOKENS, MASK  # noqa: E402

V, L = 64, 9  # the vocabulary and length of GPT_TOKENS
TOKENS, PEFT = GPT_TOKENS, GPT_OPT_PEFT
U = 2.0 ** -8  # bfloat16's unit roundoff (8 significand bits)


def _torch_forward(hf, tokens=TOKENS, mask=MASK):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
              output_attentions=True)


def _torch_logits(hf, tokens=TOKENS, mask=MASK):
  return _torch_forward(hf, tokens, mask).logits.float().numpy()


def _apply(loaded, tables=None, tokens=TOKENS, ctx=None, mask=MASK, dtype_cfg=None):
  cfg = dtype_cfg or loaded.config
  model = make_decoder(cfg, PEFT)
  variables = {'params': loaded.params, 'adaptors': loaded.adaptors if tables is None else tables}
  ctx = np.zeros(tokens.shape, np.int32) if ctx is None else ctx
  return np.asarray(model.apply(variables, jnp.asarray(tokens), context_ids_BL=jnp.asarray(ctx),
                                attention_mask_BL=mask))


def test_logits_match_transformers(gpt_opt):
  loaded = gpt_opt.loaded
  assert loaded.report == checkpoints.LoadReport((), ())
  assert loaded.config.arch == gpt_opt.arch.split('_')[0]
  assert loaded.config.pre_norm == (gpt_opt.arch != 'opt_post')
  assert ('project_in' in loaded.params) == (gpt_opt.arch == 'opt_proj')
  ctx = np.arange(2 * L).reshape(2, L) % 2  # fresh adaptors leave the base function unchanged
  logits, state = make_decoder(loaded.config, PEFT).apply(
      {'params': loaded.params, 'adaptors': loaded.adaptors}, jnp.asarray(TOKENS),
      context_ids_BL=jnp.asarray(ctx), attention_mask_BL=MASK, mutable=attention.INTERMEDIATES)
  diff = np.abs(np.asarray(logits)[MASK] - gpt_opt.want[MASK]).max()
  assert diff <= 1e-4, diff  # measured ~2e-6
  # The attention weights sown for heatmaps are transformers' (rows of non-padding queries).
  probs = np.asarray(state[attention.INTERMEDIATES]['layers']['attn']['attention_probs'][0])
  np.testing.assert_allclose(probs[:, 0], gpt_opt.attentions[:, 0], atol=1e-5)
  np.testing.assert_allclose(probs[:, 1, :, :6], gpt_opt.attentions[:, 1, :, :6], atol=1e-5)
  # bf16 weights and compute: relative RMS error against the fp32 PyTorch logits.
  bf16 = checkpoints.load_decoder(gpt_opt.dir, PEFT, dtype='bfloat16')
  got = _apply(bf16, dtype_cfg=bf16.config)
  rel = np.sqrt(np.mean((got[MASK] - gpt_opt.want[MASK]) ** 2) / np.mean(gpt_opt.want[MASK] ** 2))
  # Each of the ~20 roundings on a token's path (embedding, 2 layers x (norm, q/k/v, scores,
  # softmax, out, norm, fc1, act, fc2), final norm, head) adds a relative error uniform in
  # [-U, U] (RMS U/sqrt(3)); independent, they add up to sqrt(20/3) U = 2.6 U = 0.010 RMS (the
  # measured ~0.01). 8 U = 0.031 leaves 3x for the amplification by norms and softmax; a wrong
  # weight or norm gives rel ~ 1. Below, U / 8: the weights and compute really are bfloat16
  # (float32 compute would give ~1e-6).
  assert U / 8 < rel < 8 * U, rel


def _torch_modules(hf, arch, layer):
  """transformers' module of each adapted projection; GPT-2's c_attn serves q, k and v."""
  if arch == 'gpt2':
    h = hf.transformer.h[layer]
    return {'attn/q_proj': h.attn.c_attn, 'attn/k_proj': h.attn.c_attn,
            'attn/v_proj': h.attn.c_attn, 'attn/c_proj': h.attn.c_proj,
            'mlp/c_fc': h.mlp.c_fc, 'mlp/c_proj': h.mlp.c_proj}
  d = hf.model.decoder.layers[layer]
  return {**{f'attn/{p}': getattr(d.self_attn, p)
             for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj')},
          'mlp/fc1': d.fc1, 'mlp/fc2': d.fc2}


def test_context_lora_routes_per_token(gpt_opt):
  """Context 1's random LoRA tables act on context-1 tokens only, at every adapted projection."""
  tables = jax.tree.map(np.array, gpt_opt.loaded.adaptors)
  rng = np.random.default_rng(1)
  for leaves in tables['layers'].values():
    for t in leaves.values():
      t['lora_a'] = 0.3 * rng.standard_normal(t['lora_a'].shape).astype(np.float32)
      t['lora_b'][:, 1] = 0.3 * rng.standard_normal(t['lora_b'][:, 1].shape)
  assert sorted(f'{g}/{p}' for g in tables['layers'] for p in tables['layers'][g]) == sorted(
      p.name for p in gpt_opt.loaded.config.projections())  # AF adapts every projection
  ctx = np.zeros((2, L), np.int32)
  ctx[0, 4:], ctx[1, 1::2] = 1, 1
  got = _apply(gpt_opt.loaded, tables, ctx=ctx)

  in_1 = torch.tensor(ctx == 1, dtype=torch.float32)[..., None]
  hooks = []
  for layer in range(gpt_opt.loaded.config.num_layers):
    deltas = {}  # module -> [(A, B)], q/k/v of GPT-2's c_attn concatenated in order
    for name, module in _torch_modules(gpt_opt.hf, gpt_opt.arch, layer).items():
      group, proj = name.split('/')
      t = tables['layers'][group][proj]
      deltas.setdefault(module, []).append((torch.tensor(t['lora_a'][layer, 1]),
                                            torch.tensor(t['lora_b'][layer, 1])))

    def hook(module, inputs, out, deltas=deltas):
      x = inputs[0]
      delta = torch.cat([x @ a @ b for a, b in deltas[module]], -1) * PEFT.lora.scale
      return out + in_1.reshape(*delta.shape[:-1], 1) * delta  # OPT's MLP sees [B*L, D]
    hooks += [m.register_forward_hook(hook) for m in deltas]
  try:
    want = _torch_logits(gpt_opt.hf)
  finally:
    for h in hooks:
      h.remove()
  assert np.abs(got[MASK] - want[MASK]).max() <= 1e-4
  # Tokens of context 0 before any context-1 token see the base model only.
  np.testing.assert_allclose(got[0, :4], gpt_opt.want[0, :4], atol=1e-5)
  assert np.abs(got[0, 4:] - gpt_opt.want[0, 4:]).max() > 1e-2


def test_greedy_generation_with_kv_cache_matches_transformers(gpt_opt):
  prompt = TOKENS[:, :4]
  with torch.no_grad():
    want = gpt_opt.hf.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 4, dtype=int),
                             max_new_tokens=5, do_sample=False, eos_token_id=2,
                             pad_token_id=0).numpy()[:, 4:]
  model = make_decoder(gpt_opt.loaded.config, PEFT)
  got = generate_text(model, {'params': gpt_opt.loaded.params, 'adaptors': gpt_opt.loaded.adaptors},
                      prompt, max_new_tokens=5, eos_id=2, pad_id=0, text_context=0)
  np.testing.assert_array_equal(np.asarray(got)[:, :want.shape[1]], want)


def test_presets_map_to_each_architectures_names(gpt_opt):
  cfg = gpt_opt.loaded.config
  out, up, down = decoder_config.PROJECTION_NAMES[cfg.arch]
  def chosen(method, targets):
    peft = PeftConfig(methods=(method,), targets=targets)
    return {n: a for n, a in adaptors.resolve_targets(peft, cfg.projections()).items() if a.any}
  assert set(chosen('lora', 'A')) == {'attn/q_proj', 'attn/k_proj', 'attn/v_proj', f'attn/{out}'}
  assert set(chosen('lora', 'F')) == {f'mlp/{up}', f'mlp/{down}'}
  ia3 = chosen('ia3', 'AF')
  assert {n: a.ia3 for n, a in ia3.items()} == {'attn/k_proj': 'out', 'attn/v_proj': 'out',
                                                 f'mlp/{down}': 'in'}
  assert set(chosen('lora', f'attn/{out}')) == {f'attn/{out}'}  # globs see the own names


def test_bad_inputs_and_configs(gpt_opt):
  loaded = gpt_opt.loaded
  with pytest.raises(ValueError, match=r'Position 16 is beyond the 16 learned positions'):
    _apply(loaded, tokens=np.zeros((1, 17), np.int64), mask=None)
  with pytest.raises(ValueError, match='build decoders with .*make_decoder'):
    llama.Decoder(loaded.config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  llama_cfg = hf_configs.decoder_config(dict(
      model_type='llama', vocab_size=V, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=48))
  with pytest.raises(ValueError, match=f"model_type='{loaded.config.arch}'.*arch='llama'"):
    checkpoints.load_decoder_params(gpt_opt.dir, llama_cfg)
  if gpt_opt.arch == 'gpt2':
    for bad in (dict(scale_attn_by_inverse_layer_idx=True), dict(add_cross_attention=True)):
      hf = dict(gpt_opt.hf.config.to_dict(), **bad)
      with pytest.raises(ValueError, match=f'{next(iter(bad))}=true'):
        hf_configs.decoder_config(hf)
  else:
    hf = dict(gpt_opt.hf.config.to_dict(), enable_bias=False)
    with pytest.raises(ValueError, match='enable_bias=false'):
      hf_configs.decoder_config(hf)
