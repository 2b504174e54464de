"""Adaptor plug-ins: one context's adaptor group saved on its own with its base's fingerprint,
and models assembled from plug-ins trained apart (`plugin.py`); base fingerprints
(`fingerprint.py`). `python -m cpeft_jax.plugins`
takes one out of a training run's workdir (`__main__.py`, through `cpeft_jax.runs`)."""

from cpeft_jax.plugins.fingerprint import (check_base, check_fingerprints, fingerprint,
                                           model_bases)
from cpeft_jax.plugins.plugin import (FORMAT, LEAF_METHODS, ROW_AXIS, TABLES_HASH, Plugin,
                                      adapted_contexts, assemble, check_plugin, extract,
                                      freeze_contexts, load, mask_rows, save, take_row)

__all__ = ['FORMAT', 'LEAF_METHODS', 'ROW_AXIS', 'TABLES_HASH', 'Plugin', 'adapted_contexts',
           'assemble', 'check_base', 'check_fingerprints', 'check_plugin', 'extract',
           'fingerprint', 'freeze_contexts', 'load', 'mask_rows', 'model_bases', 'save',
           'take_row']
