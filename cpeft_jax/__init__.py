"""cpeft_jax: Context-PEFT in JAX/Flax."""
