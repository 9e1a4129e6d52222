"""Input pipeline: image sources, label pairing and sharded, prefetched batches.

  src = [load_source("mnist", "train"), load_source("svhn_cropped", "train")]
  data = PairedDataset(src, partners=30, seed=0)          # indices (2, 1_682_040)
  mesh = mmvae_jax.parallel.data_mesh()
  for batch in batches(data, 128, mesh, seed=0, epoch=e):  # batch["x"], ["y"], ["mask"]
    ...

See `sources` (loading, dtype/layout rules, offline tfds behaviour), `pairing` (the MMVAE
pairing rule, 30 vs 20 partners) and `pipeline` (shuffling, padding mask, multi-host,
prefetch, resume). CUB image features and captions: `cub` (`CubPairs`, caption i <-> image
i // 10) and `captions` (tokeniser, vocabulary).
"""
from mmvae_jax.data import captions, cub
from mmvae_jax.data.pairing import PairedDataset, pair_by_label
from mmvae_jax.data.pipeline import (BatchIterator, batches, epoch_order, global_batch_rows,
                                     host_batches, num_batches, process_rows)
from mmvae_jax.data.sources import (DatasetNotPreparedError, Source, load_npz, load_source,
                                    load_sources, load_tfds, source_from_arrays)

__all__ = [
    "BatchIterator", "DatasetNotPreparedError", "captions", "cub", "PairedDataset", "Source", "batches",
    "epoch_order", "global_batch_rows", "host_batches", "load_npz", "load_source",
    "load_sources", "load_tfds", "num_batches", "pair_by_label", "process_rows",
    "source_from_arrays",
]
