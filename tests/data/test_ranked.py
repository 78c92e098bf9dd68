"""Ranked rows ``{prompt, completions|responses, scores|ratings}`` -> pairs, and detecting one row
shape per source. Pure functions first; then the Ray pipeline: accounting by input rows
(``kept + sum(dropped) == read``), one output row per kept pair, and a source of unknown or
ambiguous shape failing before any work, naming the source and the keys it saw."""
from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pytest

from raydpo.config import ConfigError, DataConfig, OnlineConfig, load_config
from raydpo.data.formats import (
    BAD_SCORE,
    EMPTY,
    IDENTICAL,
    MISSING_FIELD,
    NO_PAIR,
    RANKED_PAIRS,
    REASONS,
    UNPARSEABLE,
    detect_format,
    detect_formats,
    normalise,
    normalise_pairs,
    score_pairs,
    source_format,
)
from tests.data.checks import assert_normalised


def msg(role: str, text: str) -> dict[str, str]:
    return {"role": role, "content": text}


def pair(prompt: str, chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    return {"prompt": [msg("user", prompt)], "chosen": [msg("assistant", chosen)], "rejected": [msg("assistant", rejected)]}


RANKED = {"prompt": "2+2?", "completions": ["5", "4", "22"], "scores": [3, 9, 1]}


# --- score_pairs ------------------------------------------------------------------------------


def test_score_pairs_docstring_example() -> None:
    assert score_pairs([1, 3, 2], "best_worst") == [(1, 0)]
    assert score_pairs([1, 3, 2], "all_margin") == [(1, 0), (1, 2), (2, 0)]
    assert score_pairs([1, 3, 2], "best_worst", 1.5) == [(1, 0)]
    assert score_pairs([1, 3, 2], "all_margin", 1.5) == [(1, 0)]


@pytest.mark.parametrize("mode", RANKED_PAIRS)
def test_score_pairs_ties_and_margins(mode: str) -> None:
    assert score_pairs([2, 2, 2], mode) == []  # ties never pair, not even with margin 0
    assert score_pairs([1, 2], mode, 5.0) == []
    assert score_pairs([1, 2], mode, 1.0) == [(1, 0)]  # a gap equal to the margin is enough
    assert score_pairs([], mode) == [] and score_pairs([7], mode) == []


def test_score_pairs_best_worst_takes_the_first_of_tied_extremes() -> None:
    assert score_pairs([1, 5, 5, 1], "best_worst") == [(1, 0)]
    assert score_pairs([1, 5, 5, 1], "all_margin") == [(1, 0), (1, 3), (2, 0), (2, 3)]


def test_score_pairs_unknown_mode() -> None:
    with pytest.raises(ValueError, match="ranked_pairs"):
        score_pairs([1, 2], "pairwise")


# --- normalise_pairs on ranked rows -----------------------------------------------------------


def test_ranked_best_worst_and_all_margin() -> None:
    assert detect_format(RANKED) == "ranked" and detect_formats(RANKED) == ("ranked",)
    assert normalise_pairs(RANKED) == [(pair("2+2?", "4", "22"), "")]
    assert normalise(RANKED) == (pair("2+2?", "4", "22"), "")
    assert normalise_pairs(RANKED, ranked_pairs="all_margin") == [
        (pair("2+2?", "5", "22"), ""), (pair("2+2?", "4", "5"), ""), (pair("2+2?", "4", "22"), "")]
    assert normalise_pairs(RANKED, ranked_pairs="all_margin", min_score_margin=6) == [
        (pair("2+2?", "4", "5"), ""), (pair("2+2?", "4", "22"), "")]
    assert normalise_pairs(RANKED, "ranked", min_score_margin=9) == [(None, NO_PAIR)]


def test_ranked_messages_aliases_and_ultrafeedback_completions() -> None:
    """Prompt as messages, completions as message lists (repeating the prompt turn, which is
    stripped as for UltraFeedback), under the names ``responses`` / ``ratings``; float scores."""
    prompt = [msg("system", "S"), msg("user", "q")]
    row = {"prompt": prompt, "responses": [prompt + [msg("assistant", "a")], prompt + [msg("assistant", "b")]],
           "ratings": [0.25, 0.75]}
    out, reason = normalise(row)
    assert reason == ""
    assert out == {"prompt": prompt, "chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "a")]}
    assert normalise(row, "ranked") == (out, "")


def test_ranked_columns_map_completions_and_scores() -> None:
    row = {"question": "2+2?", "outputs": ["4", "5"], "rewards": [1.0, -1.0]}
    columns = {"prompt": "question", "completions": "outputs", "scores": "rewards"}
    assert normalise(row, columns=columns) == (pair("2+2?", "4", "5"), "")
    assert normalise(row) == (None, MISSING_FIELD)


@pytest.mark.parametrize(
    "scores",
    [[1, None], [1, math.nan], [1, math.inf], [1, "7"], [1, True], [1, [2]], [1, {"v": 2}], [1, 10**400]],
    ids=["none", "nan", "inf", "string", "bool", "list", "dict", "huge_int"],
)
def test_ranked_bad_scores(scores: list) -> None:
    row = {"prompt": "q", "completions": ["a", "b"], "scores": scores}
    for mode in RANKED_PAIRS:
        assert normalise_pairs(row, ranked_pairs=mode) == [(None, BAD_SCORE)]
        assert normalise_pairs(row, "ranked", ranked_pairs=mode) == [(None, BAD_SCORE)]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "completions": ["a", "b", "c"], "scores": [1, 2]}, UNPARSEABLE),  # lengths differ
        ({"prompt": "q", "completions": ["a", 3], "scores": [1, 2]}, UNPARSEABLE),  # a completion of no shape
        ({"prompt": "q", "completions": ["a", [{"role": "assistant"}]], "scores": [1, 2]}, MISSING_FIELD),  # no content
        ({"prompt": 5, "completions": ["a", "b"], "scores": [1, 2]}, UNPARSEABLE),  # fields present, wrong type
        ({"prompt": "q", "completions": ["a"], "scores": [1]}, NO_PAIR),
        ({"prompt": "q", "completions": [], "scores": []}, NO_PAIR),
        ({"prompt": "q", "completions": ["a", "b"], "scores": [4, 4]}, NO_PAIR),
        ({"prompt": "q", "completions": ["a", "b"]}, MISSING_FIELD),
        ({"prompt": "q", "scores": [1, 2]}, MISSING_FIELD),
        ({"completions": ["a", "b"], "scores": [1, 2]}, MISSING_FIELD),
        ({"prompt": "  ", "completions": ["a", "b"], "scores": [1, 2]}, EMPTY),
        ({"prompt": "q", "completions": ["a", " "], "scores": [1, 2]}, EMPTY),  # the best is blank
        ({"prompt": "q", "completions": ["a", "a"], "scores": [1, 2]}, IDENTICAL),
    ],
)
def test_ranked_dropped_rows(row: dict, reason: str) -> None:
    candidates = normalise_pairs(row)
    assert candidates == [(None, reason)]
    assert reason in REASONS


def test_ranked_row_keeps_its_good_pairs_and_reports_the_bad() -> None:
    """all_margin: the pair of two equal texts is identical, the other pairs are kept."""
    row = {"prompt": "q", "completions": ["same", "same", "other"], "scores": [3, 2, 1]}
    assert normalise_pairs(row, ranked_pairs="all_margin") == [
        (None, IDENTICAL), (pair("q", "same", "other"), ""), (pair("q", "same", "other"), "")]
    assert normalise(row, ranked_pairs="all_margin") == (pair("q", "same", "other"), "")


def test_row_fitting_two_shapes() -> None:
    """A pair row that also carries ranked lists fits two shapes: auto drops it; a fixed format
    reads the shape it names."""
    row = dict(RANKED, chosen="4", rejected="5")
    assert detect_formats(row) == ("standard", "ranked") and detect_format(row) is None
    assert normalise(row) == (None, UNPARSEABLE)
    assert normalise(row, "standard") == (pair("2+2?", "4", "5"), "")
    assert normalise(row, "ranked") == (pair("2+2?", "4", "22"), "")


def test_candidates_hold_the_normalise_contract() -> None:
    for out, reason in normalise_pairs(RANKED, ranked_pairs="all_margin"):
        assert_normalised(out, reason)


# --- source_format ----------------------------------------------------------------------------

STANDARD = {"prompt": "q", "chosen": "a", "rejected": "b"}
SHAREGPT = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"}}


def test_source_format_picks_the_one_shape_and_ignores_junk_rows() -> None:
    assert source_format([RANKED, {"junk": 1}, None, RANKED]) == "ranked"
    assert source_format([STANDARD, {"prompt": "q", "chosen": "a"}]) == "standard"
    assert source_format([{"q": "x", "a": "1", "b": "2"}], {"prompt": "q", "chosen": "a", "rejected": "b"}) == "standard"


def test_source_format_unknown_names_the_keys() -> None:
    with pytest.raises(ValueError) as e:
        source_format([{"question": "q", "answer": "a"}, {"question": "r", "answer_2": "b"}, [1, 2]])
    text = str(e.value)
    assert "no known row shape" in text and "first 3 rows" in text
    assert "keys seen: answer, answer_2, question." in text and "data.columns" in text
    with pytest.raises(ValueError, match="no row is a JSON object"):
        source_format(["text", 3])


def test_source_format_ambiguous_names_the_shapes() -> None:
    with pytest.raises(ValueError) as e:
        source_format([STANDARD, SHAREGPT])
    assert "ambiguous" in str(e.value) and "sharegpt, standard" in str(e.value) and "data.format" in str(e.value)
    assert "keys seen: chosen, conversations, prompt, rejected" in str(e.value)
    with pytest.raises(ValueError, match="ranked, standard"):
        source_format([dict(RANKED, chosen="a", rejected="b")])  # one row fitting two shapes


# --- config -----------------------------------------------------------------------------------


def test_config_ranked_fields(tmp_path: Path) -> None:
    import yaml

    from tests.data.test_formats_more import QUICKSTART

    assert typing.get_args(DataConfig.model_fields["ranked_pairs"].annotation) == RANKED_PAIRS
    assert typing.get_args(OnlineConfig.model_fields["pairs"].annotation) == RANKED_PAIRS  # one rule, one name
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["data"].update(format="ranked", ranked_pairs="all_margin", min_score_margin=0.5, columns={"scores": "rewards"},
                        chat_template="{{ messages }}")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    d = load_config(tmp_path / "c.yaml").data
    assert (d.format, d.ranked_pairs, d.min_score_margin, d.chat_template) == ("ranked", "all_margin", 0.5, "{{ messages }}")
    defaults = load_config(QUICKSTART).data
    assert (defaults.ranked_pairs, defaults.min_score_margin, defaults.chat_template) == ("best_worst", 0.0, None)
    for bad, key in (("data.min_score_margin=-1", "data.min_score_margin"), ("data.ranked_pairs=pairwise", "data.ranked_pairs")):
        with pytest.raises(ConfigError, match=key):
            load_config(QUICKSTART, [bad])


# --- the Ray pipeline -------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


RANKED_FILE_ROWS = [
    {"prompt": "q1", "completions": ["a", "bb", "ccc"], "scores": [1, 3, 2]},  # 1 pair / 3 pairs
    {"prompt": [msg("user", "q2")], "responses": [[msg("assistant", "x")], [msg("assistant", "y")]], "ratings": [0.5, 0.1]},
    {"prompt": "q3", "completions": ["a", "b"], "scores": [2, 2]},  # no_pair
    {"prompt": "q4", "completions": ["a", "b"], "scores": [1, None]},  # bad_score
    {"prompt": "q5", "completions": ["a", "b", "c"], "scores": [1, 2]},  # unparseable
    {"prompt": "q6", "completions": ["same", "same", "other"], "scores": [3, 2, 1]},  # all_margin: 1 identical, 2 kept
    "{broken",  # unparseable
    {"foo": 1},  # missing_field (the source is ranked)
]


@pytest.mark.parametrize("mode, pairs", [("best_worst", 3), ("all_margin", 6)])
def test_ranked_rows_through_the_pipeline(ray_local, tmp_path: Path, mode: str, pairs: int) -> None:
    from raydpo.data.pipeline import build_report, kept_rows, tokenized_dataset
    from raydpo.data.tokenize import TokenizeSettings
    from raydpo.models import build_tiny_tokenizer

    src = _write_jsonl(tmp_path / "ranked.jsonl", RANKED_FILE_ROWS)
    ds = tokenized_dataset([str(src)], [], model_path="tiny", gguf_file=None, settings=TokenizeSettings(64, 32),
                           eval_fraction=0.5, seed=0, ranked_pairs=mode).materialize()
    report = build_report(ds)
    assert report.read == 8
    assert report.kept == 3  # rows 1, 2 and 6
    assert report.pairs == pairs
    assert report.dropped == {"no_pair": 1, "bad_score": 1, "unparseable": 2, "missing_field": 1}
    assert report.kept + sum(report.dropped.values()) == report.read
    assert sum(report.splits.values()) == report.pairs
    assert report.sources[str(src)] | {"dropped": None} == {
        "read": 8, "kept": 3, "pairs": pairs, "truncated": 0, "boundary_fixed": 0, "dropped": None}
    assert f"data: read 8, kept 3, truncated 0, pairs {pairs}, boundary re-located 0" in report.summary()

    rows = kept_rows(ds).take_all()
    assert len(rows) == pairs and all(r["drop_reason"] == "" for r in rows)
    by_row: dict[int, list] = {}
    for r in rows:
        by_row.setdefault(r["row_id"], []).append(r)
    assert sorted(by_row) == [1, 2, 6]
    for group in by_row.values():
        assert [r["pair_index"] for r in group] == list(range(len(group)))
        assert len({r["split"] for r in group}) == 1  # a prompt's pairs share its split
    tok = build_tiny_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    first = [(list(r["chosen_ids"]), list(r["rejected_ids"])) for r in by_row[1]]
    expected = {"best_worst": [("bb", "a")], "all_margin": [("bb", "a"), ("bb", "ccc"), ("ccc", "a")]}[mode]
    assert first == [(ids(c), ids(r)) for c, r in expected]


def test_source_of_unknown_or_ambiguous_shape_fails_before_any_work(ray_local, tmp_path: Path) -> None:
    from raydpo.data.pipeline import DataError, build_report, tokenized_dataset
    from raydpo.data.tokenize import TokenizeSettings

    good = _write_jsonl(tmp_path / "good.jsonl", [STANDARD])
    qa = _write_jsonl(tmp_path / "qa.jsonl", ["{broken", {"question": "q", "answer": "a"}, {"question": "r", "answer": "b", "id": "x"}])
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [STANDARD, SHAREGPT])
    kw = dict(model_path="tiny", gguf_file=None, settings=TokenizeSettings(64, 32), eval_fraction=0.0, seed=0)
    with pytest.raises(DataError) as e:
        tokenized_dataset([str(good), str(qa)], [], **kw)
    assert f"data source {qa}: no known row shape in its first 2 rows; keys seen: answer, id, question." in str(e.value)
    with pytest.raises(DataError) as e:
        tokenized_dataset([str(good)], [str(mixed)], **kw)  # eval sources are checked too
    assert f"data source {mixed}: ambiguous row shape" in str(e.value) and "sharegpt, standard" in str(e.value)
    # A mapping that makes the fields known passes; a fixed format skips detection, dropping rows.
    columns = {"prompt": "question", "chosen": "answer", "rejected": "id"}
    with pytest.raises(DataError, match="no known row shape"):
        tokenized_dataset([str(qa)], [], columns={"prompt": "question"}, **kw)
    report = build_report(tokenized_dataset([str(qa)], [], fmt="standard", **kw).materialize())
    assert (report.read, report.kept, report.dropped) == (3, 0, {"unparseable": 1, "missing_field": 2})
    assert tokenized_dataset([str(qa)], [], columns=columns, **kw) is not None  # detected as standard


def test_chat_template_reaches_the_workers_and_boundary_fixes_are_counted(ray_local, tmp_path: Path) -> None:
    """A BPE tokenizer saved without a chat template; the configured one ends its generation
    prompt in a space, so every pair's boundary is re-located (see test_tokenize.py)."""
    from raydpo.data.pipeline import build_report, kept_rows, tokenized_dataset
    from raydpo.data.tokenize import TokenizeSettings
    from tests.data.checks import bpe_tokenizer
    from tests.data.test_tokenize import SPACE_TEMPLATE

    tok = bpe_tokenizer(corpus=["Q: hi", "A: Yes", "A: No"] * 10)
    tok.save_pretrained(tmp_path / "tok")
    src = _write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "chosen": "Yes", "rejected": "No"}] * 2)
    kw = dict(model_path=str(tmp_path / "tok"), gguf_file=None, settings=TokenizeSettings(64, 32), eval_fraction=0.0, seed=0)
    ds = tokenized_dataset([str(src)], [], chat_template=SPACE_TEMPLATE, **kw).materialize()
    report = build_report(ds)
    assert (report.read, report.kept, report.pairs, report.boundary_fixed) == (2, 2, 2, 2)
    assert report.sources[str(src)]["boundary_fixed"] == 2 and "boundary re-located 2" in report.summary()
    row = kept_rows(ds).take(1)[0]
    assert list(row["chosen_ids"]) == tok.convert_tokens_to_ids(["ĠYes", "<eos>"])
    # No template configured and none in the tokenizer: the plain one, whose prompt ends in "Assistant:".
    row = kept_rows(tokenized_dataset([str(src)], [], **kw)).take(1)[0]
    assert tok.decode(row["prompt_ids"]) == "User: hi\n\nAssistant:"
    assert list(row["chosen_ids"]) == tok.convert_tokens_to_ids(["ĠYes", "<eos>"])
