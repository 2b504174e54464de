"""Adaptors leaving and entering as other formats: PyTorch PEFT adapters and merged checkpoints.

- peft_names.py: where our projections live in transformers' decoder layers, PEFT's names.
- peft_format.py: one context's LoRA (or DoRA) group as a PEFT adapter, both ways
  (`export_peft`, `import_peft`, `peft_config_of`).
- merge.py: a context's adaptors folded into the frozen weights (`merged_params`,
  `save_merged`: a plain Hugging Face checkpoint).
- convert.py: plug-in <-> PEFT adapter -> merged checkpoint conversions and their command line
  (`python -m cpeft_jax.interop.convert`); import it as a module, it is not re-exported here
  (so that running it with -m does not find it already imported).
"""

from cpeft_jax.interop.merge import merged_params, merged_per_context, save_merged
from cpeft_jax.interop.peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                           export_peft, import_peft, lora_targets,
                                           peft_config_of, read_peft_config)
from cpeft_jax.interop.peft_names import PEFT_LAYER, Piece, pieces

__all__ = ['ADAPTER_CONFIG', 'ADAPTER_WEIGHTS', 'PEFT_LAYER', 'Piece',
           'export_peft', 'import_peft', 'lora_targets', 'merged_params', 'merged_per_context',
           'peft_config_of', 'pieces', 'read_peft_config', 'save_merged']
