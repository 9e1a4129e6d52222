r"""Trains a model on MNIST-SVHN (the paper's headline experiment); the MMVAE by default.

    python experiments/mnist_svhn.py --k=30
    python experiments/mnist_svhn.py --model=mopoe --workdir=runs/mnist_svhn_mopoe

MNIST and SVHN are tfds `mnist` and `svhn_cropped` under --data_dir (default
~/tensorflow_datasets); on a connected machine the first run downloads and prepares them
(--download=auto, needs `pip install -e ".[data]"`; README "Data" for sizes).
Offline, any .npz sources work, e.g. real MNIST and the SVHN-shaped USPS stand-in of
experiments/make_usps_colour.py:

    python experiments/mnist_svhn.py --mnist=data/mnist.npz --svhn=data/usps_colour.npz \
        --workdir=runs/offline

Re-running the same command in the same --workdir resumes from its latest checkpoint; evaluate
with experiments/evaluate.py --workdir=....
"""
from mmvae_jax import cli

if __name__ == "__main__":
  cli.run_script("mnist_svhn", "mnist_svhn.py")
