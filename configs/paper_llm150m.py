"""The paper's ~150M Llama-2-style LLM with one adaptor setting of its grid.

Usage: --config=configs/paper_llm150m.py:method=lora,rank=64,targets=AF,contexts=specific
  method: lora | ia3 | bitfit | lora+bitfit | none ('+' combines methods on one layer)
  targets: A (attention), F (feed-forward), AF (both), or projection patterns (q_proj;v_proj)
  contexts: agnostic (one adaptor group) | specific (image and text groups)
"""

import ml_collections

from cpeft_jax import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, method='lora', rank=8, alpha=0.0, targets='AF',
                          contexts='specific')
  if a.contexts not in ('agnostic', 'specific'):
    raise ValueError(f'contexts={a.contexts!r}; expected agnostic or specific.')
  c = ml_collections.ConfigDict()
  # Width 768, 12 layers, 12 heads, fused gate+up 768 -> 6144, down 3072 -> 768, OPT-125m's
  # vocabulary (its frozen input embeddings). The paper does not give its RoPE base.
  c.model = dict(vocab_size=50272, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072, fused_gate_up=True, rope_theta=10000.0,
                 rms_norm_eps=1e-6, tie_embeddings=False, residual_dropout=0.1,
                 dtype='bfloat16', param_dtype='float32', remat=False)
  methods = () if a.method == 'none' else tuple(a.method.split('+'))
  c.peft = dict(
      methods=methods,
      targets=a.targets.replace(';', ','),
      num_contexts=2 if a.contexts == 'specific' else 1,
      # The paper does not state alpha; alpha = rank keeps the LoRA scale at 1.
      lora=dict(rank=a.rank, alpha=float(a.alpha or a.rank), rslora=False,
                init='kaiming_uniform', dropout=0.0),
      strategy='auto')
  return c
