"""Check preference data before training: read -> normalise -> tokenize, then report what happened.

``raydpo data-check SOURCE... [--model tiny] [--max-length N] [--max-prompt-length N] [--json]``
runs the training job's own data pipeline (same reasons, same counts) and adds token-length
percentiles of prompt, chosen and rejected over the kept rows. With ``--json`` stdout is exactly one
JSON object. Ray starts locally, or joins ``RAY_ADDRESS``. A source that cannot be read or decoded
(see ``raydpo.data.sources``), or any other input error, is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from raydpo.data.formats import COLUMN_TARGETS, FORMATS


def check(
    sources: list[str],
    *,
    model: str,
    gguf_file: str | None,
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    quiet: bool = False,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    chat_template: str | None = None,
    ranked_pairs: str = "best_worst",
    min_score_margin: float = 0.0,
) -> dict[str, Any]:
    """Run the pipeline on ``sources`` and return the report dict (``DataReport.to_dict()``, lengths included, + settings)."""
    import ray
    import ray.data

    from jobs.stages import ray_data_errors_off_the_console
    from raydpo.data.pipeline import bound_oom_retries, build_report, length_stats, tokenized_dataset
    from raydpo.data.tokenize import TokenizeSettings

    t0 = time.perf_counter()
    # The tiny model's tokenizer is built in code by every worker (load_tokenizer("tiny")), so no
    # model folder is written: a temp dir on the driver would not exist on a remote cluster's nodes.
    bound_oom_retries()  # before ray.init, which reads it
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=not quiet)
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    if quiet:
        ctx.enable_progress_bars = False
    try:
        settings = TokenizeSettings(max_length, max_prompt_length, truncation)
        with ray_data_errors_off_the_console():  # a damaged source is found by a read task
            tokenized = tokenized_dataset(sources, [], model_path=model, gguf_file=gguf_file, settings=settings,
                                          eval_fraction=0.0, seed=0, columns=columns, fmt=fmt, chat_template=chat_template,
                                          ranked_pairs=ranked_pairs, min_score_margin=min_score_margin)  # materialized
            report = build_report(tokenized)
            report.lengths = length_stats(tokenized)
    finally:
        ctx.enable_progress_bars = bars
    out = report.to_dict()
    out["settings"] = {"model": model, "gguf_file": gguf_file, "max_length": max_length,
                       "max_prompt_length": max_prompt_length, "truncation": truncation}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["_summary"] = report.summary()
    return out


def render(result: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [result["_summary"]]
    for source, c in result["sources"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(c["dropped"].items())) or "none"
        lines.append(f"  source {source}: read {c['read']}, kept {c['kept']}, truncated {c['truncated']}, "
                     f"dropped: {dropped}")
    lines.append("  token lengths over kept rows (p50 / p90 / p99 / max):")
    for part, s in result["lengths"].items():
        lines.append(f"    {part:<8} " + " / ".join("-" if s[k] is None else str(s[k]) for k in ("p50", "p90", "p99", "max")))
    lines.append(f"  ({result['seconds']:.1f}s)")
    return "\n".join(lines)


def _read_template(path: str) -> str:
    """The template file's text; a ``ValueError`` naming the file where it is not UTF-8 or does not compile."""
    from raydpo.data.tokenize import check_chat_template

    try:
        text = Path(path).read_text(encoding="utf-8")
        check_chat_template(text)
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"--chat-template {path}: {e}") from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydpo data-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="JSONL files (.gz too), globs or URIs")
    parser.add_argument("--model", default="tiny", help="tokenizer: 'tiny' (default), HF hub id or local folder")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--truncation", choices=["keep_end", "keep_start"], default="keep_end")
    parser.add_argument("--format", default="auto", choices=list(FORMATS), help="row shape (default: detected per source)")
    parser.add_argument("--ranked-pairs", choices=["best_worst", "all_margin"], default="best_worst",
                        help="ranked rows -> pairs: best vs worst, or every pair with a score gap >= --min-score-margin")
    parser.add_argument("--min-score-margin", type=float, default=0.0)
    parser.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template file (default: the tokenizer's, else plain)")
    parser.add_argument("--column", action="append", default=[], metavar="FIELD=NAME",
                        help="read FIELD (prompt, chosen, ...) from column NAME; repeatable")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    ns = parser.parse_args(argv)
    columns = dict(c.split("=", 1) for c in ns.column if "=" in c) or None
    if len(ns.column) != len(columns or {}) or not set(columns or {}) <= set(COLUMN_TARGETS):
        print(f"raydpo data-check: --column wants FIELD=NAME with FIELD in {', '.join(COLUMN_TARGETS)}", file=sys.stderr)
        return 2

    from raydpo.data.sources import expand_sources
    from raydpo.errors import input_error

    if not 0 < ns.max_prompt_length < ns.max_length:
        print("raydpo data-check: need 0 < --max-prompt-length < --max-length", file=sys.stderr)
        return 2
    try:
        # Fails before Ray starts: a source that names nothing, or that its first bytes show cannot be
        # read (a SourceError, which is a ValueError); a chat template that does not compile.
        expand_sources(ns.sources)
        chat_template = _read_template(ns.chat_template) if ns.chat_template else None
    except (FileNotFoundError, ValueError) as e:
        print(f"raydpo data-check: {e}", file=sys.stderr)
        return 2

    stdout = sys.stdout
    # With --json nothing but the JSON object reaches stdout: anything printed meanwhile goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if ns.json else contextlib.nullcontext():
        try:
            result = check(ns.sources, model=ns.model, gguf_file=ns.gguf_file, max_length=ns.max_length,
                           max_prompt_length=ns.max_prompt_length, truncation=ns.truncation, quiet=ns.json,
                           fmt=ns.format, columns=columns, chat_template=chat_template,
                           ranked_pairs=ns.ranked_pairs, min_score_margin=ns.min_score_margin)
        except Exception as e:
            # The user's input: a source of unknown row shape, or one that fails while it is read (a
            # truncated gzip, a JSON syntax error, no rows), raised here or inside a Ray task.
            error = input_error(e)
            if error is None:
                raise
            print(f"raydpo data-check: {error}", file=sys.stderr)
            return 2
    if ns.json:
        result.pop("_summary")
        stdout.write(json.dumps(result) + "\n")
    else:
        stdout.write(render(result) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
