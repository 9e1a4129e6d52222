"""Evaluation of trained multimodal VAEs: the paper's Tables 1-4 and Figs 4-5.

  from mmvae_jax import evaluation as ev
  clf = {"mnist": ev.classifiers.for_source(mnist_train, mnist_test), ...}
  ev.cross_coherence(model, params, test_set, clf, key=key)          # Table 2, cross
  ev.joint_coherence(model, params, clf, key=key, num=10000)         # Table 2, joint
  ev.subset_coherence(model, params, test_set, clf, key=key)         # any subset -> the rest
  ev.latent_probe(model, params, train_set, test_set, key=key)       # Table 1
  ev.log_likelihoods(model, params, test_set, key=key, num_samples=1000)   # Table 3

Every function takes any model of the library and uses only its protocol
(`mmvae_jax.models.MultimodalVAE`): ``posterior(params, observed)`` of any subset of modalities
(a distribution, or a `UniformMixture` of them: `mmvae_jax.models.components`), ``reconstruct``,
``cross_generate``, ``generate``, ``decode``, ``prior``.

Modules: `classifiers` (digit classifiers with a checksummed cache), `coherence`, `probe`,
`likelihood` (chunked importance sampling), `figures` (PNG), `common` (subsets, batches),
`cca` (the CUB CCA coherence of Table 4; imports gensim only when fitting FastText) and
`report` (the whole evaluation of a trained run: ``report.evaluate(run, settings)``, the printed
tables and results.json).
"""
from mmvae_jax.evaluation import cca, classifiers, coherence, common, figures, likelihood, probe
from mmvae_jax.evaluation.classifiers import Classifier, DigitClassifier
from mmvae_jax.evaluation.coherence import cross_coherence, joint_coherence, subset_coherence
from mmvae_jax.evaluation.likelihood import batch_log_likelihoods, log_likelihoods
from mmvae_jax.evaluation.probe import latent_probe

__all__ = [
    "Classifier", "DigitClassifier", "batch_log_likelihoods", "cca", "classifiers", "coherence",
    "common", "cross_coherence", "figures", "joint_coherence", "latent_probe", "likelihood",
    "log_likelihoods", "probe", "subset_coherence",
]
