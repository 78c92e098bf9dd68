"""``raydpo data-check CONFIG`` end to end on a real local Ray: counts by reason and source, lengths, exit codes."""
from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

import pytest
import yaml


def _good(i: int) -> str:
    return json.dumps({"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)})


def _config(tmp_path: Path, *sources: Path | str, **data) -> str:
    """A config of the tiny model's tokenizer whose data.train is ``sources``, with ``data`` settings."""
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny"},
                                    "data": {"train": [str(s) for s in sources], **data}}))
    return str(path)


SHORT = ["--set", "data.max_length=96", "--set", "data.max_prompt_length=64"]


def _write(tmp_path: Path) -> tuple[Path, Path]:
    plain = tmp_path / "mixed.jsonl"
    lines = [_good(i) for i in range(6)]
    lines += [
        '{"prompt": "broken", "chosen": ',  # bad JSON
        json.dumps({"prompt": "Q?", "chosen": "A"}),  # no rejected
        json.dumps({"prompt": "Q?", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": "Q?", "chosen": "", "rejected": "B"}),
        "",  # a blank line is not a row
        json.dumps({"prompt": "x" * 200, "chosen": "long prompt", "rejected": "kept, truncated"}),
    ]
    plain.write_text("\n".join(lines) + "\n")
    packed = tmp_path / "more.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write("\n".join([_good(i) for i in range(10, 13)] + [json.dumps({"prompt": "P", "chosen": "C", "rejected": "C"})]) + "\n")
    return plain, packed


def test_json_report_accounts_for_every_row(ray_local, tmp_path, capsys):
    from jobs.data_check import main

    plain, packed = _write(tmp_path)
    code = main([_config(tmp_path, plain, tmp_path / "*.gz"), *SHORT, "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object

    assert out["read"] == 15
    assert out["kept"] + sum(out["dropped"].values()) == out["read"]
    assert out["kept"] == 10
    assert out["dropped"] == {"unparseable": 1, "missing_field": 1, "identical": 2, "empty": 1}
    assert out["truncated"] == 1
    assert set(out["examples"]) == set(out["dropped"])
    assert out["examples"]["unparseable"] == [f"{plain}:7"]

    sources = out["sources"]
    assert set(sources) == {str(plain), str(packed)}
    assert sources[str(plain)] == {"read": 11, "kept": 7, "pairs": 7, "truncated": 1, "boundary_fixed": 0,
                                   "dropped": {"unparseable": 1, "missing_field": 1, "identical": 1, "empty": 1}}
    assert sources[str(packed)] == {"read": 4, "kept": 3, "pairs": 3, "truncated": 0, "boundary_fixed": 0,
                                    "dropped": {"identical": 1}}

    lengths = out["lengths"]
    assert set(lengths) == {"prompt", "chosen", "rejected"}
    for part, s in lengths.items():
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (part, s)
    assert lengths["prompt"]["max"] == 64  # the 200-char prompt, truncated to max_prompt_length
    assert lengths["chosen"]["max"] <= 96 - 64


def test_text_report(ray_local, tmp_path, capsys):
    from jobs.data_check import main

    plain, _ = _write(tmp_path)
    assert main([_config(tmp_path, plain, max_length=96, max_prompt_length=64)]) == 0
    text = capsys.readouterr().out
    assert "data: read 11, kept 7, truncated 1" in text
    assert f"source {plain}: read 11, kept 7" in text
    assert "prompt" in text and "p50 / p90 / p99 / max" in text


def test_missing_source_exits_2(tmp_path, capsys):
    from jobs.data_check import main

    code = main([_config(tmp_path, tmp_path / "nothing-*.jsonl"), "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "matches no file" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_bad_config_or_no_sources_exits_2(tmp_path, capsys):
    """A key the config does not have is named; a config without data.train has nothing to check."""
    from jobs.data_check import main

    plain, _ = _write(tmp_path)
    assert main([_config(tmp_path, plain), "--set", "data.max_lenght=96", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "data.max_lenght" in captured.err
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"  # data.synthetic
    assert main([str(quickstart), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "names no data.train sources" in captured.err


# --- bad rows never crash the job ----------------------------------------------------------------


def _check_json(capsys, config: str, *args: str) -> dict:
    from jobs.data_check import main

    code = main([config, *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["kept"] + sum(out["dropped"].values()) == out["read"]
    return out


def test_lone_surrogate_is_a_counted_drop(ray_local, tmp_path, capsys):
    """Once a TypeError from the tokenizer inside a Ray task; now ``invalid_unicode``."""
    path = tmp_path / "surrogate.jsonl"
    bad = json.dumps({"prompt": "hi \ud800", "chosen": "a", "rejected": "b"})  # written as the escape "\ud800"
    assert "\\ud800" in bad
    path.write_text("\n".join([_good(1), _good(2), bad, _good(3)]) + "\n")
    out = _check_json(capsys, _config(tmp_path, path))
    assert (out["read"], out["kept"], out["dropped"]) == (4, 3, {"invalid_unicode": 1})
    assert out["examples"] == {"invalid_unicode": [f"{path}:3"]}


def test_nesting_past_the_parser_stack_is_a_counted_drop(ray_local, tmp_path, capsys):
    """Once a RecursionError (on the driver, detecting the shape, and in the tasks); now
    ``too_deeply_nested``. A JSON array file that deep is one such row."""
    lines = tmp_path / "deep.jsonl"
    lines.write_text("\n".join([_good(1), "[" * 20_000, _good(2), '{"prompt": ' + "[" * 20_000]) + "\n")
    array = tmp_path / "deep.json"
    array.write_text("[" + _good(3) + ", " + "[" * 20_000 + "]" * 20_000 + "]")
    out = _check_json(capsys, _config(tmp_path, lines, array))
    assert (out["read"], out["kept"], out["dropped"]) == (5, 2, {"too_deeply_nested": 3})
    assert out["examples"]["too_deeply_nested"] == [f"{lines}:2", f"{lines}:4", f"{array}:1"]


@pytest.mark.parametrize(("template", "prompt"), [
    ("GEMMA_TEMPLATE", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]),
    ("MISTRAL_TEMPLATE", [{"role": "user", "content": "2+2?"}, {"role": "user", "content": "Well?"}]),
])
def test_template_that_raises_is_a_counted_drop(ray_local, tmp_path, capsys, template, prompt):
    """Once a jinja TemplateError from ``raise_exception`` (Gemma on a system turn, Mistral on roles
    out of order); now ``template_error``, and the template keeps the rows it accepts."""
    from tests.data import checks

    def row(prompt: list[dict[str, str]]) -> str:
        return json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                           "rejected": [{"role": "assistant", "content": "5"}]})

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([row([{"role": "user", "content": "2+2?"}]), row(prompt), row([{"role": "user", "content": "2+2"}])]) + "\n")
    out = _check_json(capsys, _config(tmp_path, path, chat_template=getattr(checks, template)))
    assert (out["read"], out["kept"], out["dropped"]) == (3, 2, {"template_error": 1})
    assert out["examples"] == {"template_error": [f"{path}:2"]}


def test_template_that_does_not_compile_exits_2(tmp_path, capsys):
    from jobs.data_check import main

    path = tmp_path / "rows.jsonl"
    path.write_text(_good(1) + "\n")
    assert main([_config(tmp_path, path, chat_template="{% for m in messages %}\n{{ m['content'] }"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "data.chat_template: Value error, chat template line 2: " in captured.err


def test_file_name_that_is_not_utf8_exits_2(tmp_path, capsys):
    """Such a name reaches Python with lone surrogates, which no Arrow column holds: the source is
    named and the run stops before Ray starts."""
    from jobs.data_check import main

    with open(os.fsencode(tmp_path) + b"/bad\xff.jsonl", "wb") as f:
        f.write(_good(1).encode() + b"\n")
    assert main([_config(tmp_path, tmp_path / "*.jsonl"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "the file name is not valid UTF-8" in captured.err and "bad" in captured.err


def test_thousands_of_hostile_rows(ray_local, tmp_path, capsys):
    """2,000 seeded hostile rows (``tests.data.checks.hostile_rows``: surrogates, deep nesting,
    wrong types at every level, NUL bytes, huge strings, turns that Gemma's template rejects)
    through the job: the report's counts are exactly those of the pipeline's function run in-process."""
    from collections import Counter

    import pyarrow as pa

    from raydpo.data.pipeline import tokenize_batch
    from raydpo.data.tokenize import TokenizeSettings
    from tests.data.checks import GEMMA_TEMPLATE, hostile_rows

    rows = hostile_rows(12, 2000, shapes=("conversational",))
    path = tmp_path / "hostile.jsonl"
    path.write_text("".join(text + "\n" for text, _ in rows), encoding="utf-8")
    out = _check_json(capsys, _config(tmp_path, path, format="conversational", chat_template=GEMMA_TEMPLATE),
                      "--set", "data.max_length=96", "--set", "data.max_prompt_length=48")

    batch = pa.table({"source": ["s"] * len(rows), "row_id": list(range(1, len(rows) + 1)),
                      "split": ["train"] * len(rows), "text": [text for text, _ in rows]})
    oracle = tokenize_batch(batch, model_path="tiny", gguf_file=None, settings=TokenizeSettings(96, 48),
                            eval_fraction=0.0, seed=0, fmt="conversational", chat_template=GEMMA_TEMPLATE)
    reasons = Counter(r["drop_reason"] for r in oracle.to_pylist() if r["pair_index"] == 0)
    assert out["read"] == 2000
    assert out["kept"] == reasons.pop("")
    assert out["dropped"] == dict(reasons)
    for reason in ("invalid_unicode", "too_deeply_nested", "template_error", "unparseable"):
        assert out["dropped"][reason] > 0, reason


# --- a source that cannot be read or decoded ----------------------------------------------------


def test_source_damaged_past_its_first_bytes_exits_2_with_one_line(ray_local, tmp_path, capsys):
    """A gzip cut after 400 good lines: the driver's checks (first bytes) and format detection
    (first rows) pass, so the read task inside Ray Data finds the cut. Once 400 rows trained on and
    the loss unsaid; now the job stops, naming the file and the last complete line. In-process
    (--json), and as the command a user runs: its stderr holds Ray's INFO lines, then that one
    line, and no traceback (under pytest's capture an in-process run cannot show that: Ray Data's
    console handler keeps the closed capture of an earlier test)."""
    import subprocess
    import sys

    from jobs.data_check import main

    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(_good(i) for i in range(5)) + "\n")
    full = gzip.compress(("\n".join(_good(i) for i in range(800)) + "\n").encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full[: len(full) // 2])
    lines = zlib.decompressobj(wbits=31).decompress(cut.read_bytes()).count(b"\n")
    assert 64 < lines < 800
    message = (f"raydpo data-check: data source {cut}: the gzip stream is truncated after line {lines}: "
               f"the rest of the file is lost (how many rows is unknown); re-create or re-download it")
    config = _config(tmp_path, good, cut)
    code = main([config, "--json"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.out == "" and captured.err.splitlines()[-1] == message, captured.err

    done = subprocess.run([sys.executable, "-m", "jobs.cli", "data-check", config], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and done.stderr.splitlines()[-1] == message, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("truncated after line") == 1, done.stderr


def test_source_that_is_not_a_file_of_rows_exits_2_before_ray(tmp_path, capsys):
    """A FIFO (which would block a read task forever) and UTF-16 without a mark: one line each,
    from the driver's checks, before Ray starts."""
    from jobs.data_check import main

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    wide = tmp_path / "wide.jsonl"
    wide.write_bytes(("\n".join(_good(i) for i in range(3)) + "\n").encode("utf-16-le"))
    for path, cause in [(fifo, "is a FIFO (named pipe), not a regular file"),
                        (wide, "looks like UTF-16 LE text without a byte-order mark")]:
        assert main([_config(tmp_path, path), "--json"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1
        assert captured.err.startswith(f"raydpo data-check: data source {path}: {cause}"), captured.err
