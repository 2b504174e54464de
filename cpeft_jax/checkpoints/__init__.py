"""Hugging Face checkpoint files <-> Flax trees, in four rooms.

- io.py: what does not depend on the architecture: `resolve` (a directory, or a hub id already
  in the local cache; never downloads), `read_config`, the tensor sources (safetensors, Flax
  msgpack, in-memory arrays, Split/Concat views), leaf planning and filling, the load report.
- decoder.py: the decoder name maps (Llama/Mistral/Qwen2, GPT-2, OPT) and `load_decoder`.
- vision.py: the vision name maps (CLIP, SigLIP, Swin V2) and `load_vision`.
- hf_save.py: the writers, the name maps read backwards: `save_decoder`, `save_vision`.

Imports run io -> {decoder, vision} -> hf_save. The names callers use are re-exported here
(`checkpoints.load_decoder`, `checkpoints.save_decoder`, `checkpoints.resolve`, ...).
"""

from cpeft_jax.checkpoints.decoder import (ARCH_OF, NAME_MAPS, DecoderNames, Pretrained,
                                           input_embeddings, load_decoder, load_decoder_params,
                                           params_from_state_dict)
from cpeft_jax.checkpoints.hf_save import save_decoder, save_vision
from cpeft_jax.checkpoints.io import (CONFIG, SAFETENSORS, SAFETENSORS_INDEX, LoadReport,
                                      read_config, resolve, swap_in)
from cpeft_jax.checkpoints.tensors import open_weights
from cpeft_jax.checkpoints.vision import encoder_module, load_vision, vision_module

__all__ = [
    'ARCH_OF', 'CONFIG', 'NAME_MAPS', 'SAFETENSORS', 'SAFETENSORS_INDEX', 'DecoderNames',
    'LoadReport', 'Pretrained', 'encoder_module', 'input_embeddings', 'load_decoder',
    'load_decoder_params', 'load_vision',
    'open_weights', 'params_from_state_dict', 'read_config', 'resolve', 'save_decoder',
    'save_vision', 'swap_in', 'vision_module',
]
