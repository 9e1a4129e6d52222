r"""Trains a model on PolyMNIST (five 28×28 RGB modalities) from the authors' folder layout.

    python experiments/polymnist.py --data_dir=PolyMNIST --model=mmvae_plus
    python experiments/polymnist.py --data_dir=PolyMNIST --model=mopoe --workdir=runs/poly_mopoe

--data_dir holds train/ and test/, each with m0 ... m4 subfolders of <index>.<label>.png images
(see mmvae_jax.data.polymnist). Re-running the same command in the same --workdir resumes from
its latest checkpoint; evaluate with experiments/evaluate.py --workdir=....
"""
from mmvae_jax import cli

if __name__ == "__main__":
  cli.run_script("polymnist", "polymnist.py")
