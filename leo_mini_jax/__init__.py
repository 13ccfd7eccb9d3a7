"""LEO-MINI in JAX/Flax."""
