r"""Trains a model on three digit modalities: MNIST + USPS colour (SVHN-shaped) + USPS (16×16).

    python experiments/three_digits.py --data_dir=path/to/npz --max_steps=20 --k=4 --batch_size=32
    python experiments/three_digits.py --data_dir=path/to/npz --model=mvae

--data_dir holds mnist.npz, usps_colour.npz (experiments/make_usps_colour.py) and usps.npz, or
give each with --mnist, --usps_colour, --usps. See mmvae_jax.experiments.digits for the networks
and λ. Re-running the same command in the same --workdir resumes from its latest checkpoint.
"""
from mmvae_jax import cli

if __name__ == "__main__":
  cli.run_script("three_digits", "three_digits.py")
