"""The ``raydpo`` command: ``train``, ``iterate`` (online DPO rounds), ``precompute`` (reference
log-probs), ``data-check``, ``sync-tracking`` (deliver spooled MLflow data) and ``submit`` (a
training job on a Ray cluster). Each command is a job module's ``main``; this file only
dispatches (it imports no job until one is named)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "jobs.train_dpo", "iterate": "jobs.iterative_dpo", "precompute": "jobs.precompute", "data-check": "jobs.data_check",
                "sync-tracking": "jobs.sync_tracking", "submit": "jobs.submit"}
    if not argv or argv[0] not in commands:
        print("usage: raydpo {train|iterate} CONFIG [--set dotted.key=value ...] [--verbose]\n"
              "       raydpo precompute CONFIG [--set dotted.key=value ...] [--json]\n"
              "       raydpo data-check CONFIG [--set dotted.key=value ...] [--json]\n"
              "       raydpo sync-tracking OUTPUT_DIR [--timeout S]\n"
              "       raydpo submit CONFIG --address http://HEAD:8265 [--follow] [--set dotted.key=value ...]",
              file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
