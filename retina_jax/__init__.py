"""retina_jax: RetinaNet and focal loss in JAX/Flax."""
