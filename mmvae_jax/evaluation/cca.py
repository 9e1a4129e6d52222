"""CUB coherence by CCA (the paper's Table 4; official analyse_cub.py / helper.py).

Sentence embedding (as the official code, not the paper's plain average):

* FastText (gensim) on the word-tokenised *train* captions: vector size 300, window 3,
  min_count 3, 10 epochs, other gensim defaults.
* Table rows: vocabulary words -> their FastText vectors; ``<exc>``, ``<pad>``, ``<eos>`` -> the
  constant vectors −1, 0, +1 (300-d).
* SIF weights a / (a + f(w)), a = 1e-3, f(w) = count(w) / (number of train word tokens);
  ``<exc>`` uses the pooled count of all out-of-vocabulary tokens, ``<pad>`` and ``<eos>`` 0.
* Sentence vector: the tokens up to and including the first ``<eos>`` (all 32 without one);
  s = Σ_t weight_t · emb_t / T with T the number of kept tokens.
* First principal component removed: v = first right-singular vector of the centred train
  sentence matrix; s <- s − v vᵀ s.

CCA (official ``cca``): views = features (each image once per caption) and sentence vectors of
the train pairs; covariances with 1/(N − 1); A = [[0, C12], [C21, 0]], B = blockdiag(C11, C22),
1e-12 added to both diagonals; the generalised eigenproblem A v = ρ B v is solved by
`scipy.linalg.eigh` (symmetric-definite; `scipy.linalg.eig`, the official non-symmetric solver, if
B is not positive definite); the top k = 40 eigenvectors, each scaled to unit Euclidean norm as
the official solver returns them, are split into P_img (2048 × k) and P_emb (300 × k).

Score of a set of pairs: mean over the pairs of cos((a − μ_img) P_img, (s − μ_emb) P_emb).

Table 4 (for a trained image-feature/caption MMVAE, with ``params["batch_stats"]`` in place):

* ground truth: real feature vs real caption;
* cross I→S: real feature vs the argmax caption decoded from the image expert's sample (K = 1);
* cross S→I: decoded feature mean from the sentence expert's sample vs the real caption;
* joint: decoded feature mean vs argmax caption of the same prior sample (1,000 samples).

Cross scores are per-batch means (batch 256, shuffled with the seed) averaged with equal batch
weights, stopping at the first incomplete batch as the official loop (``drop_last=False`` scores
every pair).

Because FastText training is not deterministic across machines, the fitted embedding table,
weights, principal component and projections are saved with the run (`CCAModel.save`) and reused.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmvae_jax.data import captions as cap

EMBEDDING_DIM = 300
FASTTEXT = {"vector_size": 300, "window": 3, "min_count": 3, "epochs": 10}
SIF_A = 1e-3
NUM_COMPONENTS = 40
RIDGE = 1e-12
PAPER_TABLE4 = {"MMVAE": {"joint": 0.263, "cross_i2s": 0.104, "cross_s2i": 0.135,
                          "ground_truth": 0.273},
                "MVAE": {"joint": -0.095, "cross_i2s": 0.011, "cross_s2i": -0.013,
                         "ground_truth": None}}


# ---------------------------------------------------------------------------------------------
# Sentence vectors.


def fit_fasttext(tokenised: Sequence[Sequence[str]], *, seed: int = 0, workers: int = 1,
                 **overrides):
  """gensim FastText on tokenised train captions with the official settings (`FASTTEXT`)."""
  try:
    from gensim.models import FastText
  except ImportError:
    raise ImportError("the CCA coherence needs gensim (pip install gensim, or the package's "
                      "'cub' extra)") from None
  kw = {**FASTTEXT, **overrides}
  sentences = [list(t) for t in tokenised]
  return FastText(sentences=sentences, seed=seed, workers=workers, **kw)


def embedding_table(word_vectors: Callable[[str], np.ndarray], vocab: cap.Vocabulary,
                    dim: int = EMBEDDING_DIM) -> np.ndarray:
  """(V, dim) rows: −1, 0, +1 for <exc>, <pad>, <eos>; `word_vectors(word)` for the others."""
  table = np.empty((len(vocab), dim), np.float32)
  table[cap.EXC], table[cap.PAD], table[cap.EOS] = -1.0, 0.0, 1.0
  for i, w in enumerate(vocab.words[3:], start=3):
    table[i] = word_vectors(w)
  return table


def sif_weights(vocab: cap.Vocabulary, a: float = SIF_A) -> np.ndarray:
  """(V,) a / (a + count/total); <exc> from the pooled OOV count; <pad>, <eos> 0."""
  if vocab.total <= 0:
    raise ValueError("the vocabulary has no word counts (build it with build_vocabulary)")
  f = vocab.counts.astype(np.float64) / float(vocab.total)
  w = a / (a + f)
  w[cap.PAD] = w[cap.EOS] = 0.0
  return w.astype(np.float32)


def weighted_average(ids: np.ndarray, table: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """SIF sentence vectors before PC removal.

  Args:
    ids: (N, T) token ids.
    table: (V, E) embedding rows; weights: (V,).
  Returns:
    (N, E): Σ_t w_t e_t / T over the tokens up to and including the first <eos>.
  """
  ids = np.asarray(ids).astype(np.int64)
  if ids.ndim != 2:
    raise ValueError(f"token ids must be (N, T), got shape {ids.shape}")
  if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
    raise ValueError(f"token ids must lie in [0, {len(table)}), found {ids.min()}..{ids.max()}")
  is_eos = ids == cap.EOS
  keep = (np.cumsum(is_eos, axis=1) - is_eos) == 0  # up to and including the first <eos>
  count = keep.sum(axis=1, keepdims=True)
  w = np.where(keep, weights[ids], 0.0)
  out = np.einsum("nt,nte->ne", w, table[ids], optimize=True)
  return (out / np.maximum(count, 1)).astype(np.float32)


def first_principal_component(vectors: np.ndarray) -> np.ndarray:
  """(E,) first right-singular vector of the centred (N, E) matrix (numpy SVD)."""
  centred = vectors - vectors.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
  return vt[0].astype(np.float32)


def remove_component(vectors: np.ndarray, pc: np.ndarray) -> np.ndarray:
  """s − v vᵀ s for every row s (applied to the uncentred vectors, as the official code)."""
  return vectors - np.outer(vectors @ pc, pc).astype(vectors.dtype)


# ---------------------------------------------------------------------------------------------
# CCA.


def fit_cca(x: np.ndarray, y: np.ndarray, k: int = NUM_COMPONENTS, ridge: float = RIDGE
            ) -> dict[str, np.ndarray]:
  """The official CCA of paired views x (N, p) and y (N, q).

  Returns:
    {"mean_x": (p,), "mean_y": (q,), "proj_x": (p, k), "proj_y": (q, k), "eigenvalues": (k,)},
    eigenvalues (the canonical correlations of the top components) in descending order.
  """
  import scipy.linalg

  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
    raise ValueError(f"fit_cca: views must be (N, p) and (N, q) with the same N, got {x.shape} "
                     f"and {y.shape}")
  n, p = x.shape
  q = y.shape[1]
  if n < 2:
    raise ValueError(f"fit_cca needs at least 2 pairs, got {n}")
  if not 1 <= k <= p + q:
    raise ValueError(f"fit_cca: k must be in [1, {p + q}], got {k}")
  mx, my = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - mx, y - my
  c11 = xc.T @ xc / (n - 1)
  c22 = yc.T @ yc / (n - 1)
  c12 = xc.T @ yc / (n - 1)
  a = np.zeros((p + q, p + q))
  a[:p, p:], a[p:, :p] = c12, c12.T
  b = np.zeros((p + q, p + q))
  b[:p, :p], b[p:, p:] = c11, c22
  a[np.diag_indices_from(a)] += ridge
  b[np.diag_indices_from(b)] += ridge
  try:
    vals, vecs = scipy.linalg.eigh(a, b)
  except np.linalg.LinAlgError:  # B not positive definite: the official non-symmetric solver
    vals, vecs = scipy.linalg.eig(a, b)
    vals, vecs = np.real(vals), np.real(vecs)
    finite = np.isfinite(vals)
    vals, vecs = np.where(finite, vals, -np.inf), vecs
  order = np.argsort(-vals, kind="stable")[:k]
  vals, vecs = vals[order], vecs[:, order]
  vecs = vecs / np.linalg.norm(vecs, axis=0, keepdims=True)
  return {"mean_x": mx.astype(np.float32), "mean_y": my.astype(np.float32),
          "proj_x": vecs[:p].astype(np.float32), "proj_y": vecs[p:].astype(np.float32),
          "eigenvalues": vals.astype(np.float32)}


def cca_cosines(x: np.ndarray, y: np.ndarray, fit: dict[str, np.ndarray]) -> np.ndarray:
  """(N,) cos((x − μ_x) P_x, (y − μ_y) P_y) of each pair (paper eq. (4))."""
  px = (np.asarray(x, np.float64) - fit["mean_x"]) @ fit["proj_x"]
  py = (np.asarray(y, np.float64) - fit["mean_y"]) @ fit["proj_y"]
  num = np.sum(px * py, axis=1)
  den = np.linalg.norm(px, axis=1) * np.linalg.norm(py, axis=1)
  return (num / np.maximum(den, 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The fitted pipeline.


@dataclasses.dataclass(frozen=True)
class CCAModel:
  """Everything needed to score (feature, caption) pairs; saved with a run.

  Attributes:
    table: (V, 300) word embedding rows; weights: (V,) SIF weights; pc: (300,) removed component.
    mean_img, proj_img: (2048,), (2048, k); mean_emb, proj_emb: (300,), (300, k).
    eigenvalues: (k,) canonical correlations of the fitted components.
  """
  table: np.ndarray
  weights: np.ndarray
  pc: np.ndarray
  mean_img: np.ndarray
  proj_img: np.ndarray
  mean_emb: np.ndarray
  proj_emb: np.ndarray
  eigenvalues: np.ndarray

  def sentence_vectors(self, ids: np.ndarray) -> np.ndarray:
    """(N, 32) token ids -> (N, 300) SIF sentence vectors with the first PC removed."""
    return remove_component(weighted_average(ids, self.table, self.weights), self.pc)

  def correlations(self, features: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(N,) CCA cosine of each (feature (N, 2048), caption ids (N, 32)) pair."""
    fit = {"mean_x": self.mean_img, "proj_x": self.proj_img, "mean_y": self.mean_emb,
           "proj_y": self.proj_emb}
    return cca_cosines(features, self.sentence_vectors(ids), fit)

  def save(self, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **dataclasses.asdict(self))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "CCAModel":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no fitted CCA (fit_cca_model writes it)")
    with np.load(path) as npz:
      missing = [f.name for f in dataclasses.fields(cls) if f.name not in npz.files]
      if missing:
        raise ValueError(f"{path}: not a CCA file (missing {', '.join(missing)})")
      return cls(**{f.name: npz[f.name] for f in dataclasses.fields(cls)})


def fit_cca_model(features: np.ndarray, ids: np.ndarray, tokenised: Sequence[Sequence[str]],
                  vocab: cap.Vocabulary, *, k: int = NUM_COMPONENTS, seed: int = 0,
                  fasttext_overrides: dict | None = None) -> CCAModel:
  """Fits FastText, SIF, the PC and the CCA on train pairs.

  Args:
    features: (N, 2048) the image feature of every train pair (each image once per caption).
    ids: (N, 32) the pair's caption token ids.
    tokenised: the word tokens of the train captions (FastText's corpus).
    vocab: the train vocabulary (with counts).
  """
  if len(features) != len(ids):
    raise ValueError(f"fit_cca_model: {len(features)} features but {len(ids)} captions")
  ft = fit_fasttext(tokenised, seed=seed, **(fasttext_overrides or {}))
  table = embedding_table(lambda w: ft.wv[w], vocab, ft.wv.vector_size)
  weights = sif_weights(vocab)
  raw = weighted_average(ids, table, weights)
  pc = first_principal_component(raw)
  fit = fit_cca(features, remove_component(raw, pc), k=k)
  return CCAModel(table=table, weights=weights, pc=pc, mean_img=fit["mean_x"],
                  proj_img=fit["proj_x"], mean_emb=fit["mean_y"], proj_emb=fit["proj_y"],
                  eigenvalues=fit["eigenvalues"])


# ---------------------------------------------------------------------------------------------
# Table 4.


def _batches(n: int, batch_size: int, seed: int, drop_last: bool) -> list[np.ndarray]:
  order = np.random.default_rng(seed).permutation(n)
  stop = (n // batch_size) * batch_size if drop_last else n
  out = [order[s:min(s + batch_size, stop)] for s in range(0, stop, batch_size)]
  if not out:
    raise ValueError(f"no complete batch of {batch_size} in {n} test pairs (use drop_last=False "
                     f"or a smaller batch)")
  return out


def ground_truth(cca: CCAModel, dataset, *, shuffle_seed: int | None = None) -> float:
  """Mean correlation of the real (feature, caption) pairs of `dataset`; with `shuffle_seed`,
  of mismatched pairs (captions permuted) as a chance baseline."""
  rows = np.arange(len(dataset))
  (feats, toks), _ = dataset.gather(rows)
  if shuffle_seed is not None:
    toks = toks[np.random.default_rng(shuffle_seed).permutation(len(toks))]
  return float(np.mean(cca.correlations(feats, toks)))


def cross_coherence(model, params, cca: CCAModel, dataset, *, key: jax.Array,
                    batch_size: int = 256, seed: int = 0, drop_last: bool = True) -> dict:
  """Cross I→S, S→I and ground truth, per-batch means averaged over batches.

  `model` has modalities ("image", "sentence"); `params` should carry ``batch_stats``.
  """
  if tuple(model.names) != ("image", "sentence"):
    raise ValueError(f"the CCA coherence needs modalities ('image', 'sentence'), got {model.names}")
  recon = jax.jit(model.reconstruct)
  scores = {"cross_i2s": [], "cross_s2i": [], "ground_truth": []}
  batches = _batches(len(dataset), batch_size, seed, drop_last)
  for i, rows in enumerate(batches):
    (feats, toks), _ = dataset.gather(rows)
    out = recon(params, (jnp.asarray(feats), jnp.asarray(toks)), jax.random.fold_in(key, i))
    gen_caption = np.asarray(jnp.argmax(out[0][1], axis=-1))   # image expert -> sentence decoder
    gen_feature = np.asarray(out[1][0])                          # sentence expert -> image decoder
    scores["cross_i2s"].append(float(np.mean(cca.correlations(feats, gen_caption))))
    scores["cross_s2i"].append(float(np.mean(cca.correlations(gen_feature, toks))))
    scores["ground_truth"].append(float(np.mean(cca.correlations(feats, toks))))
  res = {k: float(np.mean(v)) for k, v in scores.items()}
  res["num_pairs"] = int(sum(len(b) for b in batches))
  res["num_batches"] = len(batches)
  return res


def joint_coherence(model, params, cca: CCAModel, *, key: jax.Array, num: int = 1000) -> dict:
  """Correlation of the decoded feature mean and argmax caption of `num` prior samples."""
  feats, logits = jax.jit(model.generate, static_argnums=2)(params, key, num)
  caption = np.asarray(jnp.argmax(logits, axis=-1))
  return {"joint": float(np.mean(cca.correlations(np.asarray(feats), caption))), "num": num}


def format_table4(ours: dict, label: str = "ours") -> str:
  """Table 4 with the paper's rows beside ours (None/absent entries print as '-')."""
  cols = (("joint", "Joint"), ("cross_i2s", "Cross (I→S)"), ("cross_s2i", "Cross (S→I)"),
          ("ground_truth", "Ground truth"))
  fmt = lambda v: f"{v:>14.3f}" if isinstance(v, (int, float)) else f"{'-':>14}"
  lines = [f"{'':<16}" + "".join(f"{h:>14}" for _, h in cols)]
  lines.append(f"{label:<16}" + "".join(fmt(ours.get(k)) for k, _ in cols))
  for name, row in PAPER_TABLE4.items():
    lines.append(f"{'paper ' + name:<16}" + "".join(fmt(row.get(k)) for k, _ in cols))
  return "\n".join(lines)
