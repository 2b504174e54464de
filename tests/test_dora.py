"""Context-DoRA: a per-token slow reference (C = 2), and parity with PyTorch PEFT's DoRA (C = 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpeft_jax import adaptors, checkpoints
from cpeft_jax.adaptors import ContextDense, LayerAdaptor, LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.llama import Decoder
from helpers import D_IN, D_OUT, init_random, reference

DORA = LayerAdaptor(dora=True)
CFG = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, rope_theta=500.0, rms_norm_eps=1e-5)
RANK, ALPHA = 4, 8.0
# Our projection group -> the Hugging Face module holding it.
GROUPS = {'attn': 'self_attn', 'mlp': 'mlp'}


@pytest.mark.parametrize('strategy', ['onehot', 'grouped'])
def test_two_context_dora_matches_per_token_reference(strategy):
  peft = PeftConfig(methods=('dora',), num_contexts=2, lora=LoraConfig(rank=3, alpha=5.0),
                    strategy=strategy, tile=4)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, D_IN)), jnp.float32)
  ctx = jnp.asarray(rng.integers(0, 2, (2, 9)), jnp.int32)
  layer, v = init_random(DORA, peft, x, ctx)
  want = reference(v, DORA, peft, x.reshape(-1, D_IN), ctx.reshape(-1)).reshape(2, 9, D_OUT)
  np.testing.assert_allclose(layer.apply(v, x, ctx), want, rtol=2e-5, atol=2e-5)
  # Fresh tables (B = 0, m = ||W||_col) leave the base unchanged, and so does init_dora_magnitudes.
  fresh = layer.init(jax.random.key(0), x, ctx)
  base = ContextDense(D_OUT, use_bias=True).apply({'params': fresh['params']}, x, ctx)
  np.testing.assert_allclose(layer.apply(fresh, x, ctx), base, rtol=1e-6, atol=1e-6)
  again = adaptors.init_dora_magnitudes(fresh['params'], fresh['adaptors'])
  np.testing.assert_allclose(again['dora_m'], fresh['adaptors']['dora_m'], rtol=1e-6)


def _peft_dora_model():
  """A tiny Llama wrapped by PyTorch PEFT's DoRA with random nonzero B and magnitudes."""
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  import transformers
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
      tie_word_embeddings=False))
  base_sd = {k: v.clone() for k, v in hf.state_dict().items()}
  model = peft.get_peft_model(hf, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, use_dora=True, lora_dropout=0.0,
      target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                      'down_proj']))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.copy_(0.3 * torch.randn_like(p))
      elif 'lora_magnitude_vector' in name:
        p.mul_(1 + 0.2 * torch.randn_like(p))
  return model, base_sd


def tables_from_peft(state_dict, template):
  """PEFT's lora_A [r, in], lora_B [out, r], lora_magnitude_vector [out] -> our [L, 1, ...]."""
  out = {}
  for group, projs in template['layers'].items():
    for proj, leaves in projs.items():
      prefix = [f'base_model.model.model.layers.{i}.{GROUPS[group]}.{proj}'
                for i in range(CFG.num_layers)]
      get = lambda suffix: np.stack([state_dict[f'{p}.{suffix}'].detach().numpy()
                                     for p in prefix])
      tables = {'lora_a': get('lora_A.default.weight').transpose(0, 2, 1)[:, None],
                'lora_b': get('lora_B.default.weight').transpose(0, 2, 1)[:, None],
                'dora_m': get('lora_magnitude_vector.default.weight')[:, None]}
      assert all(tables[k].shape == leaves[k].shape for k in leaves), proj
      out.setdefault(group, {})[proj] = tables
  return {'layers': out}


def test_matches_pytorch_peft_dora():
  import torch
  model, base_sd = _peft_dora_model()
  peft = PeftConfig(methods=('dora',), targets='all', lora=LoraConfig(rank=RANK, alpha=ALPHA))
  ours = Decoder(CFG, peft)
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9))
  params, report = checkpoints.params_from_state_dict(base_sd, CFG, model_type='llama')
  assert report == checkpoints.LoadReport((), ())
  template = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.asarray(tokens)))
  tables = jax.tree.map(jnp.asarray, tables_from_peft(model.state_dict(),
                                                      template[adaptors.ADAPTORS]))
  # Both sides differentiate the same loss; PEFT's gradients include its detached norm.
  weights = np.random.default_rng(1).normal(size=(2, 9, CFG.vocab_size)).astype(np.float32)
  model.train()  # dropout is 0; PEFT's DoRA caches nothing in training mode
  logits_t = model(input_ids=torch.tensor(tokens)).logits
  (logits_t * torch.tensor(weights)).sum().backward()
  want = logits_t.detach().numpy()
  want_grads = tables_from_peft({k: p.grad for k, p in model.named_parameters()
                                 if p.grad is not None}, template[adaptors.ADAPTORS])

  def loss(t):
    logits = ours.apply({'params': params, 'adaptors': t}, jnp.asarray(tokens))
    return jnp.sum(logits * weights), logits
  (_, got), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(tables)
  diff = float(np.abs(np.asarray(got) - want).max())
  print(f'DoRA logits max abs diff vs PyTorch PEFT: {diff:.2e}')
  assert diff <= 1e-4
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3,
                                                       atol=1e-4 * np.abs(w).max()),
               grads, jax.tree.map(jnp.asarray, want_grads))
