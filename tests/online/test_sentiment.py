"""The controlled-sentiment experiment's pieces: the JSON sentiment classifier scored without
scikit-learn (``raydpo.online.sentiment``) against scikit-learn itself on real IMDb reviews, the
prompts of ``bench/imdb_sentiment.py``, and ``configs/imdb_online.yaml``.

The real data is ../shared/data/imdb; these tests skip where it is absent (a fresh clone).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from raydpo.online.judges import PromptItem, VerifierJudge
from raydpo.online.sentiment import TfidfLogistic, load_classifier, positive

from ..conftest import SHARED

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "imdb_sentiment.py"
IMDB = SHARED / "data" / "imdb"
needs_imdb = pytest.mark.skipif(not (IMDB / "imdb_aclImdb_test.jsonl.gz").exists(), reason="../shared/data is absent")


def bench_module():
    """bench/imdb_sentiment.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("imdb_sentiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A classifier fitted on 3000 real training reviews (seconds, not the minute of all 25k),
    saved as JSON; ``(bench module, vectorizer, model, json path, 300 test reviews)``."""
    importlib.import_module("sklearn")  # a declared test dependency: missing is a failure, not a skip

    if not (IMDB / "imdb_aclImdb_train.jsonl.gz").exists():
        pytest.skip("../shared/data is absent")
    bench = bench_module()
    train = random.Random(0).sample(bench.read_split(IMDB, "train"), 3000)
    vectorizer, model = bench.fit([bench.clean(r["text"]) for r in train], [r["label"] for r in train])
    path = tmp_path_factory.mktemp("imdb") / "sentiment.json"
    path.write_text(json.dumps(bench.classifier_json(vectorizer, model)))
    test = random.Random(1).sample(bench.read_split(IMDB, "test"), 300)
    return bench, vectorizer, model, path, test


def test_verifier_matches_sklearn_predict_proba(fitted):
    """Real test reviews (raw with their HTML, and clean), short completion-like texts, and the
    edge cases: no known term (the intercept alone), empty, repeats (sublinear tf), case, unicode."""
    bench, vectorizer, model, path, test = fitted
    texts = [r["text"] for r in test[:150]] + [bench.clean(r["text"]) for r in test[150:]]
    texts += [" ".join(bench.clean(r["text"]).split()[:12]) for r in test[:50]]  # as long as a completion
    texts += ["", "zzqx qqzv", "GREAT great Great!!! great", "bad bad bad bad bad movie",
              "Ce film était génial — vraiment", "the the the", "a", "I loved it. I hated it."]
    expected = model.predict_proba(vectorizer.transform(texts))[:, 1]
    clf = load_classifier(str(path))
    got = [clf.probability(t) for t in texts]
    worst = max(abs(g - e) for g, e in zip(got, expected))
    assert worst < 1e-9, worst
    decisions = model.decision_function(vectorizer.transform(texts[:20]))
    assert max(abs(clf.decision(t) - d) for t, d in zip(texts[:20], decisions)) < 1e-9
    # And the verifier's own signature, as VerifierJudge calls it.
    assert abs(positive("ignored prompt", texts[0], {}, model=str(path)) - expected[0]) < 1e-9


def test_classifier_separates_sentiment_and_judge_scores(fitted):
    """Even the small classifier is a usable reward: right on most held-out reviews, and through
    VerifierJudge (the config's spec) a plainly positive text outscores a plainly negative one."""
    bench, vectorizer, model, path, test = fitted
    clf = load_classifier(str(path))
    right = sum((clf.probability(bench.clean(r["text"])) > 0.5) == (r["label"] == 1) for r in test)
    assert right / len(test) > 0.8
    judge = VerifierJudge("raydpo.online.sentiment:positive", {"model": str(path)})
    item = PromptItem([{"role": "user", "content": "p"}], "p", {"prompt": "p"})
    [scored] = judge.score([item], [["A wonderful, moving film with a great cast. I loved it.",
                                     "A boring, awful film with terrible acting. I hated it."]])
    assert scored.failures == {}
    assert scored.scores[0] > 0.5 > scored.scores[1]


def test_classifier_file_is_checked(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="bench/imdb_sentiment.py train"):
        load_classifier(str(missing))
    data = {"format": "raydpo-tfidf-logistic-v1", "vocabulary": {"good": 0}, "idf": [1.0], "coef": [1.0],
            "intercept": 0.0, "vectorizer": {"analyzer": "char", "lowercase": True, "token_pattern": r"\w+",
                                             "ngram_range": [1, 1], "sublinear_tf": False, "norm": "l2"}}
    with pytest.raises(ValueError, match="analyzer"):
        TfidfLogistic.from_json(data)
    with pytest.raises(ValueError, match="format"):
        TfidfLogistic.from_json({**data, "format": "pickle"})


@needs_imdb
def test_prompts_are_balanced_html_free_test_prefixes(tmp_path):
    out = tmp_path / "prompts.jsonl"
    done = subprocess.run([sys.executable, str(SCRIPT), "prompts", "--n", "40", "--out", str(out), "--data", str(IMDB)],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["prompts"] == 40
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and sum(r["label"] for r in rows) == 20
    assert len({r["prefix"].lower() for r in rows}) == 40
    bench = bench_module()
    test_ids = {r["id"]: r for r in bench.read_split(IMDB, "test")}
    for r in rows:
        assert "<" not in r["prompt"] and ">" not in r["prompt"] and "br /" not in r["prompt"]
        assert len(r["prefix"].split()) == 8
        assert r["prompt"] == bench.PROMPT_TEMPLATE.format(prefix=r["prefix"])
        source = test_ids[r["id"]]  # from the test split, which the judge never saw
        assert source["label"] == r["label"]
        assert bench.clean(source["text"]).startswith(r["prefix"])


def test_script_says_where_the_data_is(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "prompts", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "p.jsonl")], capture_output=True, text=True)
    assert done.returncode != 0
    assert "imdb_aclImdb_test.jsonl.gz not found" in done.stderr and "../shared/data" in done.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_config_loads_and_reads_the_scripts_outputs():
    from raydpo.config import load_config

    cfg = load_config(str(ROOT / "configs" / "imdb_online.yaml"))
    bench, online = bench_module(), cfg.online
    assert online.judge.verifier == "raydpo.online.sentiment:positive"
    assert online.judge.verifier_args == {"model": str(bench.CLASSIFIER_OUT)}
    assert online.prompts == [str(bench.PROMPTS_OUT)]
    assert online.rounds == 3 and online.reference == "initial" and cfg.model.dtype == "float32"
    # The held-out prompts and a round's sample both come out of the default prompt file.
    assert online.eval_prompts + online.prompts_per_round <= bench.N_PROMPTS
