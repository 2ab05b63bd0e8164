"""qtarget-jax: supervised fine-tuning in JAX with the SFT target as a first-class design choice."""

__version__ = "0.1.0"
