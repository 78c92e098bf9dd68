"""A sentiment verifier for the controlled-sentiment experiment of the DPO paper (Fig. 2):
``verifier: raydpo.online.sentiment:positive`` with ``verifier_args: {model: outputs/imdb/sentiment.json}``.

The classifier is TF-IDF + logistic regression, fitted with scikit-learn by
``bench/imdb_sentiment.py train`` and saved as plain JSON. Scoring re-implements its transform in
numpy and Python, so a run needs no scikit-learn, and gives ``predict_proba``'s positive column to
float rounding (tests/online/test_sentiment.py checks 1e-9 on real reviews). What it reproduces of
``TfidfVectorizer``: the word analyzer (lowercase, ``token_pattern``, n-grams of ``ngram_range``,
no stop words, no accent stripping), counts of the vocabulary's terms only, ``sublinear_tf``
(1 + log tf), idf weights, and the ``l2``/``l1`` norm; a file with other settings is refused.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

FORMAT = "raydpo-tfidf-logistic-v1"
# The vectorizer settings this module implements only in their scikit-learn default.
_FIXED = {"analyzer": "word", "strip_accents": None, "stop_words": None, "binary": False}


@dataclass(frozen=True)
class TfidfLogistic:
    """A binary TF-IDF + logistic regression classifier (class 1 = positive)."""

    vocabulary: dict[str, int]  # term (n-gram words joined by one space) -> feature column
    idf: np.ndarray | None  # float64 per column; None: no idf weighting
    coef: np.ndarray  # float64 per column: the positive class's weights
    intercept: float
    lowercase: bool
    token_pattern: re.Pattern[str]
    ngram_range: tuple[int, int]
    sublinear_tf: bool
    norm: str | None  # "l2", "l1" or None

    @classmethod
    def from_json(cls, data: dict) -> TfidfLogistic:
        """The classifier from ``bench/imdb_sentiment.py``'s JSON; a ``ValueError`` for another format
        or a vectorizer setting this module does not reproduce."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} classifier (format {data.get('format')!r})")
        v = data["vectorizer"]
        for key, default in _FIXED.items():
            if v.get(key, default) != default:
                raise ValueError(f"vectorizer setting {key}={v[key]!r} is not supported (only {default!r})")
        if v["norm"] not in ("l2", "l1", None):
            raise ValueError(f"vectorizer norm {v['norm']!r} is not supported")
        pattern = re.compile(v["token_pattern"])
        if pattern.groups > 1:  # scikit-learn refuses these too
            raise ValueError(f"token_pattern {v['token_pattern']!r} has more than one capturing group")
        idf = np.asarray(data["idf"], dtype=np.float64) if v.get("use_idf", True) else None
        coef = np.asarray(data["coef"], dtype=np.float64)
        vocabulary = {str(term): int(column) for term, column in data["vocabulary"].items()}
        if len(vocabulary) != len(coef) or (idf is not None and len(idf) != len(coef)):
            raise ValueError(f"{len(vocabulary)} terms, {len(coef)} coefficients and "
                             f"{'no' if idf is None else len(idf)} idf weights: they must agree")
        low, high = v["ngram_range"]
        return cls(vocabulary, idf, coef, float(data["intercept"]), bool(v["lowercase"]), pattern,
                   (int(low), int(high)), bool(v["sublinear_tf"]), v["norm"])

    def terms(self, text: str) -> list[str]:
        """The text's words and n-grams, as scikit-learn's word analyzer makes them."""
        words = self.token_pattern.findall(text.lower() if self.lowercase else text)
        low, high = self.ngram_range
        out: list[str] = []
        for n in range(low, min(high, len(words)) + 1):
            out += [" ".join(words[i: i + n]) for i in range(len(words) - n + 1)]
        return out

    def features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The text's TF-IDF vector, sparse: ``(columns, values)``, columns ascending."""
        counts = Counter(self.vocabulary[t] for t in self.terms(text) if t in self.vocabulary)
        columns = np.array(sorted(counts), dtype=np.int64)
        values = np.array([counts[c] for c in columns], dtype=np.float64)
        if self.sublinear_tf:
            values = 1.0 + np.log(values)
        if self.idf is not None:
            values = values * self.idf[columns]
        scale = {"l2": math.sqrt(float(values @ values)), "l1": float(np.abs(values).sum()), None: 1.0}[self.norm]
        if scale > 0:  # an all-zero vector (no known term) stays zero, as in scikit-learn
            values = values / scale
        return columns, values

    def decision(self, text: str) -> float:
        """The logit of P(positive | text)."""
        columns, values = self.features(text)
        return float(values @ self.coef[columns]) + self.intercept

    def probability(self, text: str) -> float:
        """P(positive | text): the logistic function of the decision, without overflow at either end."""
        d = self.decision(text)
        if d >= 0:
            return 1.0 / (1.0 + math.exp(-d))
        e = math.exp(d)
        return e / (1.0 + e)


@lru_cache(maxsize=None)
def load_classifier(path: str) -> TfidfLogistic:
    """The classifier in the JSON file at ``path``, read once per process and path (a judge scores
    thousands of completions with it)."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"sentiment classifier {path} not found (from the working directory "
                                f"{Path.cwd()}): make it with `python bench/imdb_sentiment.py train --out {path}`")
    return TfidfLogistic.from_json(json.loads(file.read_text(encoding="utf-8")))


def positive(prompt: str, completion: str, row: dict, model: str) -> float:
    """P(positive | completion) under the classifier at ``model`` (a JSON file): the reward of the
    controlled-sentiment task. Only the completion is scored: the prompt's review prefix is the
    same for every sample of a prompt and is not the policy's doing."""
    return load_classifier(model).probability(completion)
