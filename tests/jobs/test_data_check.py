"""``raydpo data-check`` end to end on a real local Ray: counts by reason and source, lengths, exit codes."""
from __future__ import annotations

import gzip
import json
from pathlib import Path


def _good(i: int) -> str:
    return json.dumps({"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)})


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
    code = main([str(plain), str(tmp_path / "*.gz"), "--max-length", "96", "--max-prompt-length", "64", "--json"])
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
    assert main([str(plain), "--max-length", "96", "--max-prompt-length", "64"]) == 0
    text = capsys.readouterr().out
    assert "data: read 11, kept 7, truncated 1" in text
    assert f"source {plain}: read 11, kept 7" in text
    assert "prompt" in text and "p50 / p90 / p99 / max" in text


def test_missing_source_exits_2(tmp_path, capsys):
    from jobs.data_check import main

    code = main([str(tmp_path / "nothing-*.jsonl"), "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "matches no file" in captured.err and len(captured.err.strip().splitlines()) == 1
