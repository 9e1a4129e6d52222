r"""Trains a model on CUB image features + captions (the official cubISft model by default).

With ResNet-101 features from experiments/extract_cub_features.py and the official caption files:

    python experiments/cub.py --features=data/cub/resnet101 \
        --captions=data/cub/text_trainvalclasses.txt --test_captions=data/cub/text_testclasses.txt
    python experiments/evaluate.py --workdir=runs/cub          # Table 4

Defaults: K = 50, batch 64, latent 64, λ_image = 0.002, 50 epochs. Offline (captions only, e.g.
the 50 test classes' captions as an .npz with class ids), hold out 20% of the images and use
SYNTHETIC class-conditional features in the image slot:

    python experiments/cub.py --captions=cub_captions_test.npz --synthetic_features \
        --workdir=runs/cub_offline

--model: mmvae, mvae, mopoe, ... or vae_sentence / vae_image (one modality, λ = 1). See
mmvae_jax.experiments.cub. Re-running the same command in the same --workdir resumes.
"""
from mmvae_jax import cli

if __name__ == "__main__":
  cli.run_script("cub", "cub.py")
