"""Data: TFDS datasets in, numpy batches out (token ids, pixels, masks, context ids).

Nothing here imports jax or model code.
"""
