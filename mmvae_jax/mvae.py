"""The MVAE and the single-modality VAE: see `mmvae_jax.models.mvae`."""
from mmvae_jax.models.mvae import (EXPERT_SCALES, MVAE, OBJECTIVE_ALIASES, VARIANCE_EPS,  # noqa: F401
                                   log_variance_scale, poe, product_of_experts, single_vae)

OBJECTIVES = MVAE.objectives
