"""mmvae_jax: multimodal VAEs with a mixture-of-experts posterior (Shi et al., NeurIPS 2019)."""
__version__ = "0.1.0"
