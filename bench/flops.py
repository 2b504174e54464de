"""Model FLOPs of one train step, and the bf16 peak of the GPU that runs it: MFU's two halves.

MFU = model FLOPs per step / step time / the device's dense bf16 peak. "Model FLOPs" count the
work the algorithm needs, not what an implementation happens to do (a strategy's padding or
one-hot columns are not counted), so every LoRA strategy of one shape shares one count.

`FORMULA` writes the count out; `train_flops` computes it. For T = B x S tokens:
  N_mm = layers * (4 D^2 + 3 D F) + D V: the matmul weights (q, k, v, o; gate, up, down; the
         untied LM head, which runs on every position). The embedding lookup costs none.
  forward         2 T N_mm
  input gradients 2 T N_mm: the backward pass crosses every weight, frozen or not, to reach the
                  adaptors below it (6 T N would wrongly count weight gradients of frozen weights);
                  with frozen embeddings, less 2 T 3 D^2: nothing needs the gradient of the first
                  layer's q, k, v inputs (XLA drops it)
  weight grads    2 T N_mm only when every weight trains (full fine-tuning)
  LoRA            6 T N_r, N_r = layers * r * (4 (D + D) + 3 (D + F)): each token's own rank-r
                  pair on the seven projections, forward, input and weight gradients; less
                  2 T 3 r D, the first layer's q, k, v A-input gradients (dropped as above)
  attention       12 layers B S^2 D: QK^T and PV forward (4 B S^2 D), twice that backward; the
                  full S x S scores, as XLA's dense attention computes them (causal masking not
                  discounted); softmax, norms, the optimizer and other element-wise work: none.
Heads, and grouped-query attention, do not change it (the shapes here have kv heads = heads).
"""

from __future__ import annotations

import re

FORMULA = (
    'model FLOPs / step = 2·T·N_mm (forward) + 2·T·N_mm (input gradients, through frozen '
    'weights too; PEFT: less 2·T·3D², the first layer\'s q/k/v input gradients, which frozen '
    'embeddings do not need) + [2·T·N_mm weight gradients, full fine-tuning only] + '
    '6·T·N_r − 2·T·3rD (LoRA, each token\'s own rank-r pair; less the first layer\'s q/k/v '
    'A-input gradients) + 12·layers·B·S²·D (attention scores and values, '
    'forward and backward, full S×S); T = B·S tokens, N_mm = layers·(4D² + 3DF) + D·V '
    '(projections and the untied LM head; the embedding lookup costs none), '
    'N_r = layers·r·(4·2D + 3·(D + F)); element-wise work (norms, softmax, Adam) not counted')

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, matched in
# order against the lower-cased jax device_kind (e.g. 'NVIDIA H100 80GB HBM3' is the SXM part).
PEAK_BF16_TFLOPS = (
    (r'h100.*(pcie)', 756.0),
    (r'h100.*nvl', 835.0),
    (r'h100', 989.0),  # SXM5 / HBM3
    (r'h200.*nvl', 835.0),
    (r'h200', 989.0),  # H200 SXM and GH200
    (r'b200', 2250.0),
    (r'a100', 312.0),
    (r'l40s', 362.0),
    (r'\bl4\b', 121.0),
    (r'\ba10\b', 125.0),
)


def peak_bf16_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of a jax `device_kind`, or None for a device not in the table."""
  kind = device_kind.lower()
  for pattern, tflops in PEAK_BF16_TFLOPS:
    if re.search(pattern, kind):
      return tflops
  return None


def matmul_params(shape) -> int:
  """N_mm: the weights every token multiplies (a bench.cases.Shape)."""
  D, F = shape.width, shape.ffn
  return shape.layers * (4 * D * D + 3 * D * F) + D * shape.vocab


def lora_params_per_token(shape) -> int:
  """N_r: one context's LoRA pair on q, k, v, o (D -> D) and gate, up (D -> F), down (F -> D)."""
  D, F = shape.width, shape.ffn
  return shape.layers * shape.rank * (4 * (D + D) + 3 * (D + F))


def train_flops(shape, mode: str, lora: bool = True) -> int:
  """Model FLOPs of one train step (see the module doc): mode 'peft' (frozen base; LoRA
  adaptors when `lora`) or 'full' (every weight trains, no adaptors)."""
  if mode not in ('peft', 'full'):
    raise ValueError(f"mode={mode!r}; expected 'peft' or 'full'.")
  B, S = shape.batch, shape.seq
  T = B * S
  n = matmul_params(shape)
  D = shape.width
  flops = 4 * T * n + 12 * shape.layers * B * S * S * D
  if mode == 'full':
    return flops + 2 * T * n
  flops -= 2 * T * 3 * D * D  # frozen embeddings: the first layer's q/k/v input grads unneeded
  if lora:
    flops += 6 * T * lora_params_per_token(shape) - 2 * T * 3 * shape.rank * D
  return flops


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1], or None without a peak."""
  if peak_tflops is None or seconds <= 0:
    return None
  return flops / seconds / (peak_tflops * 1e12)
