"""Reference log-probs, computed once: read -> tokenize -> cache lookup -> actor pool for the misses.

``raydpo precompute CONFIG [--set key=value ...] [--json]`` fills the cache that ``raydpo train``
reads; both call the same reference stage (``actors.reference``), so a precompute followed by a
train computes nothing twice. With ``--json`` stdout is exactly one JSON object: ``cache_key``,
``rows``, ``hits``, ``misses``, ``seconds``, ``tokens_per_s`` and the rest of ``RefStats``. The
same figures go to MLflow, in a run of their own.

A SIGTERM (spot preemption, ``ray job stop``) stops it at once with exit code 143; the cache keeps
every block finished so far, and the same command computes only the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from raydpo.config import Config, load_config_or_report
from raydpo.data.refcache import RefStats
from raydpo.progress import quiet_libraries
from raydpo.tracking import Tracker


def run(cfg: Config) -> RefStats:
    """Tokenize the config's data as ``train`` would and fill the cache for its kept pairs, once
    every folder it writes was found writable. The MLflow run ends FAILED if anything raises
    (a user's error raised inside Ray is raised as itself), KILLED on a SIGTERM (:class:`Preempted`)."""
    from actors.preemption import Preempted, SigtermStop
    from jobs import stages

    quiet_libraries()  # progress lines, not MLflow's store set-up, Ray Data's operator logs or weight-loading bars
    stages.check_writable(cfg, cfg.tracking, cache=True)  # before any work: output_dir, the cache, the store
    stages.check_model(cfg)
    stages.check_sources(cfg)
    # A new run each time, spooled in {output_dir}/precompute; an unreachable server fails here.
    tracker, _ = Tracker.start(cfg.tracking, Path(cfg.output_dir).expanduser().resolve() / "precompute",
                               cfg.tracking.run_name or "precompute", tags={"raydpo.job": "precompute"}, resume=False)
    with stages.failing_run(tracker, cfg.tracking.flush_timeout_s, lambda e: isinstance(e, Preempted)):
        prepared = stages.prepare(cfg)
        stages.start_ray(verbose=False)
        with SigtermStop():  # after ray.init, which installs a SIGTERM handler of its own
            kept, _ = stages.data(cfg, prepared, tracker)
            _, stats = stages.reference(cfg, prepared.model_path, kept, tracker)
    tracker.finish("FINISHED", timeout=cfg.tracking.flush_timeout_s)
    return stats


def main(argv: list[str] | None = None) -> int:
    from actors.preemption import EXIT_CODE, Preempted

    parser = argparse.ArgumentParser(prog="raydpo precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    ns = parser.parse_args(argv)
    cfg = load_config_or_report(ns.config, ns.overrides)  # fails before Ray starts
    if cfg is None:
        return 2
    stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr) if ns.json else contextlib.nullcontext():
            stats = run(cfg)
    except Preempted as e:
        print(f"raydpo: {e}", file=sys.stderr)
        return EXIT_CODE
    except Exception as e:  # a user's error (exit 2: a folder, a source, too many dropped rows), or a bug
        from jobs import stages

        code = stages.report_failure(e)
        if code is None:
            raise
        return code
    if ns.json:
        stdout.write(json.dumps(stats.to_dict()) + "\n")
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
