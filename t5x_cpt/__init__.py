"""t5x_cpt: cross-lingual continual pre-training in JAX/Flax."""
