"""CUB captions: tokenisation, the vocabulary and fixed-length token sequences.

As the official ``CUBSentences``:

* **Tokens**: lower-cased word tokens, split as nltk's ``word_tokenize`` splits these captions
  (Penn Treebank rules: punctuation, clitics such as ``'s`` and ``n't``, the sentence-final
  period). nltk is not a dependency: `word_tokenize` below implements the Treebank rules that
  occur in CUB captions (letters, digits, ``, . ' & ( ) ! ? ` -``). One caption is one sentence
  (the official code sentence-splits the whole file; every CUB caption line is one sentence).
* **Vocabulary**, built from the *training* captions only: the special tokens ``<exc>`` = 0
  (out of vocabulary), ``<pad>`` = 1, ``<eos>`` = 2, then every word whose count is **> 3**
  (``min_occurrence = 3``) in order of first occurrence. The official train captions give 1590
  entries (hard-coded in its networks); `OFFICIAL_VOCAB_SIZE`.
* **Sequences**: the first 31 word tokens, then ``<eos>``, right-padded with ``<pad>`` to 32;
  length = number of tokens including ``<eos>``. Unknown words become ``<exc>``.

The padding quirk: the official networks treat index 0 as the padding index
(the embedding's zero, gradient-free row and the token the likelihood ignores), but index 0 is
``<exc>``, so OOV tokens are ignored and ``<pad>`` tokens are scored. `padding_index(quirk)` gives
0 (official, default) or 1 (``<pad>``, the fix). See
docs/official-code.md#padding-index-of-the-caption-embedding.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

EXC, PAD, EOS = 0, 1, 2
SPECIALS = ("<exc>", "<pad>", "<eos>")
MAX_LENGTH = 32          # tokens per sequence, <eos> included
MIN_OCCURRENCE = 3       # a word enters the vocabulary when its count is > 3
OFFICIAL_VOCAB_SIZE = 1590

# Penn-Treebank-style rules (the subset that CUB captions need), applied to lower-cased text.
_PUNCT = re.compile(r"([,;:@#$%&!?()\[\]{}<>`\"]|--)")
_ELLIPSIS = re.compile(r"\.\.\.")
_FINAL_PERIOD = re.compile(r"([^.])(\.)([\]\)}>\"']*)\s*$")
_CLITICS = re.compile(r"([^' ])('s|'m|'d|'ll|'re|'ve|n't)(?=\s|$)")
_TRAILING_QUOTE = re.compile(r"([^' ])(')(?=\s|$)")
_LEADING_QUOTE = re.compile(r"(^|\s)(')(?=[^\s'])")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}


def word_tokenize(text: str) -> list[str]:
  """Lower-cased word tokens of one caption, e.g. "It's red, small." -> it 's red , small ."""
  s = " " + text.lower().strip() + " "
  s = _ELLIPSIS.sub(" ... ", s)
  s = _PUNCT.sub(r" \1 ", s)
  s = _FINAL_PERIOD.sub(r"\1 \2 \3 ", s.rstrip())
  s = _LEADING_QUOTE.sub(r"\1\2 ", s)
  s = _TRAILING_QUOTE.sub(r"\1 \2", s)
  s = _CLITICS.sub(r"\1 \2", s)
  tokens = []
  for tok in s.split():
    tokens.extend(_SPLIT_WORDS.get(tok, tok).split())
  return tokens


def tokenize_all(captions: Iterable[str]) -> list[list[str]]:
  """`word_tokenize` of every caption."""
  return [word_tokenize(c) for c in captions]


def padding_index(quirk: bool = True) -> int:
  """The index treated as padding: 0 (``<exc>``, the official quirk) or 1 (``<pad>``, fixed)."""
  return EXC if quirk else PAD


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Index <-> word maps; ``words[i]`` is the word of index i (``words[:3]`` are the specials).

  Attributes:
    words: tuple of V words.
    counts: (V,) int64 counts in the captions the vocabulary was built from; ``counts[EXC]`` is
      the pooled count of every out-of-vocabulary token, ``<pad>`` and ``<eos>`` count 0.
    total: total number of word tokens in those captions.
  """
  words: tuple[str, ...]
  counts: np.ndarray
  total: int

  def __post_init__(self):
    if tuple(self.words[:3]) != SPECIALS:
      raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tuple(self.words[:3])}")
    if len(set(self.words)) != len(self.words):
      raise ValueError("vocabulary words must be unique")
    if np.shape(self.counts) != (len(self.words),):
      raise ValueError(f"{len(self.words)} words but counts of shape {np.shape(self.counts)}")
    object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

  def __len__(self) -> int:
    return len(self.words)

  def index(self, word: str) -> int:
    """Index of `word`, ``EXC`` (0) when it is out of vocabulary."""
    return self._index.get(word, EXC)

  def encode(self, tokens: Sequence[str], max_length: int = MAX_LENGTH) -> tuple[np.ndarray, int]:
    """Tokens -> ((max_length,) int32 ids, length): first max_length − 1 words, <eos>, <pad>s."""
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = np.full((max_length,), PAD, np.int32)
    words = [self.index(t) for t in tokens[:max_length - 1]]
    ids[:len(words)] = words
    ids[len(words)] = EOS
    return ids, len(words) + 1

  def encode_all(self, tokenised: Sequence[Sequence[str]], max_length: int = MAX_LENGTH
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Every caption -> ((N, max_length) int32 ids, (N,) int32 lengths)."""
    ids = np.full((len(tokenised), max_length), PAD, np.int32)
    lengths = np.zeros((len(tokenised),), np.int32)
    for i, toks in enumerate(tokenised):
      ids[i], lengths[i] = self.encode(toks, max_length)
    return ids, lengths

  def decode(self, ids, stop_at_eos: bool = True, keep_specials: bool = False) -> str:
    """(T,) ids -> text; stops at the first <eos>; drops <pad> (and <eos>) unless keep_specials."""
    words = []
    for i in np.asarray(ids).astype(np.int64).tolist():
      if not 0 <= i < len(self.words):
        raise ValueError(f"token id {i} is outside the vocabulary of {len(self.words)} words")
      if i == EOS and stop_at_eos:
        if keep_specials:
          words.append(self.words[i])
        break
      if i in (PAD, EOS) and not keep_specials:
        continue
      words.append(self.words[i])
    return " ".join(words)

  def to_json(self) -> dict:
    return {"i2w": list(self.words), "w2i": {w: i for i, w in enumerate(self.words)},
            "counts": [int(c) for c in self.counts], "total": int(self.total)}

  def save(self, path: str) -> None:
    """Writes the official ``cub.vocab`` layout (JSON with w2i and i2w) plus counts and total."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no vocabulary file (it is written by experiments/cub.py "
                              f"into the run's workdir)")
    with open(path) as f:
      obj = json.load(f)
    if "i2w" not in obj:
      raise ValueError(f"{path}: not a vocabulary file (no 'i2w' key)")
    words = obj["i2w"]
    if isinstance(words, dict):  # the official file stores i2w as {"0": "<exc>", ...}
      words = [words[str(i)] for i in range(len(words))]
    counts = np.asarray(obj.get("counts", [0] * len(words)), np.int64)
    return cls(words=tuple(words), counts=counts, total=int(obj.get("total", 0)))


def build_vocabulary(tokenised: Sequence[Sequence[str]], min_occurrence: int = MIN_OCCURRENCE
                     ) -> Vocabulary:
  """The official vocabulary of tokenised (training) captions: specials, then words with
  count > `min_occurrence` in order of first occurrence."""
  counter = collections.Counter()
  order: dict[str, None] = {}
  for toks in tokenised:
    for t in toks:
      counter[t] += 1
      order.setdefault(t, None)
  words = [w for w in order if counter[w] > min_occurrence and w not in SPECIALS]
  total = int(sum(counter.values()))
  oov = total - sum(counter[w] for w in words)
  counts = np.asarray([oov, 0, 0] + [counter[w] for w in words], np.int64)
  return Vocabulary(words=SPECIALS + tuple(words), counts=counts, total=total)
