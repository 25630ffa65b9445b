"""t5x_cpt: cross-lingual continual pre-training in JAX/Flax."""

from t5x_cpt import host_malloc

# Before jax or TensorFlow start threads (t5x_cpt/host_malloc.py says why).
host_malloc.configure()
