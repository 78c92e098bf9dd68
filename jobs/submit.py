"""``raydpo submit CONFIG --address http://HEAD:8265 [--follow] [--set key=value ...]``: a training
job on a Ray cluster, through Ray's job API (``JobSubmissionClient``).

The config is validated here first: a bad one fails before anything is submitted (exit 2). The
job runs ``python -m jobs.train_dpo CONFIG --set ...`` (``jobs.iterative_dpo`` for a config with an
``online:`` section) with this project as its ``working_dir``, as
``ray job submit --working-dir . -- python -m jobs.train_dpo CONFIG`` would. With ``--follow`` it
prints the job's logs until the job ends, stops the job on Ctrl-C, and exits with the job's final
status (0 SUCCEEDED, 1 FAILED, 130 STOPPED); without, it prints the submission id and how to
follow it. Either way it says where to watch: the Ray dashboard and the MLflow UI. On a cluster with
Ray's token authentication (Ray 2.60's default) it sends the token Ray's own clients would find; a
missing or refused token exits 2 with one line saying what to set.
"""
from __future__ import annotations

import argparse
import asyncio
import fnmatch
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from raydpo.config import Config, load_config_or_report
from raydpo.progress import say

ROOT = Path(__file__).resolve().parents[1]  # the project: jobs/, actors/, raydpo/, configs/
# Left out of the working_dir, besides what .gitignore lists (Ray reads it too): environments,
# history, run outputs and caches. Ray packs the rest into one upload of at most 512 MiB.
EXCLUDES = [".venv*", ".git", "outputs", "mlruns", "mlflow.db", "*.egg-info", "__pycache__", ".pytest_cache",
            ".hypothesis"]
MAX_FILE_BYTES = 10 * 2**20  # larger files stay behind, named on the console: data and weights belong on shared storage
CONFIG_ENV = "RAYDPO_SUBMITTED_CONFIG"  # a config from outside the project travels in this variable
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


def excluded(relative: Path) -> bool:
    """Whether a path inside the project matches :data:`EXCLUDES` (by any of its parts' names)."""
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in EXCLUDES)


def large_files(root: Path = ROOT, limit: int = MAX_FILE_BYTES) -> list[str]:
    """Project files over ``limit`` bytes outside :data:`EXCLUDES`, relative (posix)."""
    out = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not excluded(here / d)]  # prune: .venv alone is gigabytes
        for name in files:
            path = Path(folder) / name
            if not excluded(here / name) and not path.is_symlink() and path.stat().st_size > limit:
                out.append((here / name).as_posix())
    return sorted(out)


def job_module(cfg: Config) -> str:
    return "jobs.iterative_dpo" if cfg.online is not None else "jobs.train_dpo"


def entrypoint(config: Path, overrides: list[str], module: str, left_behind: list[str]) -> tuple[str, dict[str, str]]:
    """The job's shell command and the environment variables it needs. A config inside the project
    travels with the working_dir (a relative path); one from elsewhere travels in
    :data:`CONFIG_ENV` and is written, under its own name, to a fresh folder on the cluster."""
    config = config.resolve()
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    try:
        relative = config.relative_to(ROOT)
    except ValueError:
        relative = None
    if relative is not None and not excluded(relative) and relative.as_posix() not in left_behind:
        return f"python -m {module} {shlex.quote(relative.as_posix())}{sets}", {}
    name = shlex.quote(config.name)
    command = (f'd=$(mktemp -d) && printf %s "${CONFIG_ENV}" > "$d"/{name} && '
               f'exec python -m {module} "$d"/{name}{sets}')
    return command, {CONFIG_ENV: config.read_text()}


def runtime_env(left_behind: list[str], env_vars: dict[str, str]) -> dict:
    """The project as the working_dir, less :data:`EXCLUDES` and the large files (anchored)."""
    env: dict = {"working_dir": str(ROOT), "excludes": EXCLUDES + ["/" + f for f in left_behind]}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def mlflow_hint(cfg: Config) -> str:
    """Where the run's MLflow UI is, as far as the submitter knows before the job starts."""
    from raydpo.tracking import display_uri

    uri = cfg.tracking.uri
    if uri is None:
        return ("tracking.uri is unset: the job logs to MLFLOW_TRACKING_URI on the cluster, else to "
                f"{{output_dir}}/mlflow.db on the head ({cfg.output_dir}); set tracking.uri to a server to see it from here")
    if uri.startswith(("http://", "https://")):
        return f"{display_uri(uri)} (experiment {cfg.tracking.experiment!r})"
    return (f"a store on the cluster's head node, {display_uri(uri)}: `mlflow ui --backend-store-uri {uri}` "
            "there (the job's last lines give the run's page)")


async def _print_logs(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", flush=True)


@contextmanager
def python_sigint() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt while following, whatever handler a library left installed
    in this process (Ray Train's fit leaves one bound to its controller); the previous one after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_terminal(client, submission_id: str, timeout_s: float = 60.0) -> str:
    """The job's status once terminal (the log stream may close a moment before it is set)."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(submission_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(submission_id)
    return str(status.value)


def use_cluster_token() -> None:
    """Send the cluster's token where one is found, as Ray's own clients do: ``RAY_AUTH_TOKEN``,
    the file ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` (where ``ray start --head`` keeps the
    one it made). Ray's job client sends a token only under ``RAY_AUTH_MODE=token``, which
    ``ray.init`` sets where it finds one and this client would otherwise not; an explicit
    ``RAY_AUTH_MODE`` is left as it is. A Ray without token authentication has nothing to do."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray before token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def token_refused(where: str, error: Exception) -> str:
    """One line for a cluster that asked for a token this machine does not have, or refused the one sent."""
    sent = "Authentication failed" in str(error)  # Ray's 403; a 401 says "Authentication required"
    why = ("refused the token sent (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order)" if sent
           else "requires Ray's token authentication and no token was found on this machine")
    return (f"the Ray cluster at {where} {why}: set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH "
            "to a file holding it (the head keeps it in ~/.ray/auth_token; docs/cluster.md, \"Token authentication\")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="raydpo submit", description="Run a training job (train, or iterate for a config with online:) on a "
        "Ray cluster through Ray's job API; exit with its final status when followed.")
    parser.add_argument("config")
    parser.add_argument("--address", default=None,
                        help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")
    parser.add_argument("--follow", action="store_true", help="print the job's logs until it ends; Ctrl-C stops it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ns = parser.parse_args(argv)

    # Setup: the config checked here, before anything reaches the cluster.
    cfg = load_config_or_report(ns.config, ns.overrides)
    if cfg is None:
        return 2
    import logging

    import ray.exceptions
    from ray.job_submission import JobSubmissionClient

    AuthenticationError = getattr(ray.exceptions, "AuthenticationError", ())  # () catches nothing: a Ray before token auth

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the upload's INFO lines: library internals
    # Its warning that .git and .venv now stay behind by default: EXCLUDES leaves them out anyway.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    left_behind = large_files()
    if left_behind:
        say(f"[raydpo] left out of the upload (over {MAX_FILE_BYTES // 2**20} MiB): {', '.join(left_behind)}")
    module = job_module(cfg)
    command, env_vars = entrypoint(Path(ns.config), ns.overrides, module, left_behind)
    use_cluster_token()
    where = ns.address or "(RAY_ADDRESS)"
    try:
        client = JobSubmissionClient(ns.address)
    except AuthenticationError as e:
        print(f"raydpo: {token_refused(where, e)}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError, ValueError) as e:
        print(f"raydpo: cannot reach the Ray cluster at {where}: {e}", file=sys.stderr)
        return 1
    dashboard = client.get_address().rstrip("/")

    # Run: submitted, then followed (Ctrl-C stops it, the final status is the exit code) or left running.
    submission_id = f"raydpo-{module.split('.')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    try:
        client.submit_job(entrypoint=command, runtime_env=runtime_env(left_behind, env_vars),
                          submission_id=submission_id, metadata={"raydpo.config": Path(ns.config).name, "raydpo.job": module})
    except AuthenticationError as e:
        print(f"raydpo: {token_refused(dashboard, e)}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError, ValueError) as e:  # the upload or the request refused
        print(f"raydpo: submitting to {dashboard} failed: {e}", file=sys.stderr)
        return 1
    say(f"[raydpo] submitted {submission_id}: "
        + (command if not env_vars else f"python -m {module} {Path(ns.config).name} (the config in ${CONFIG_ENV})"))
    say(f"[raydpo] Ray dashboard: {dashboard}/#/jobs/{submission_id}")
    say(f"[raydpo] MLflow: {mlflow_hint(cfg)}")
    if not ns.follow:
        say(f"[raydpo] follow it: ray job logs --follow {submission_id} --address {dashboard}; "
            f"stop it: ray job stop {submission_id} --address {dashboard}")
        return 0
    with python_sigint():
        return follow(client, submission_id)


def follow(client, submission_id: str) -> int:
    """Print the job's logs until it ends (Ctrl-C stops it, a second one leaves it stopping);
    its final status as an exit code."""
    try:
        asyncio.run(_print_logs(client, submission_id))
    except KeyboardInterrupt:
        say(f"\n[raydpo] Ctrl-C: stopping job {submission_id} (Ctrl-C again: exit, leaving it stopping)")
        client.stop_job(submission_id)
    try:
        status = wait_terminal(client, submission_id)
    except KeyboardInterrupt:
        return EXIT_CODES["STOPPED"]
    reason = (client.get_job_info(submission_id).message or "").split("\n")[0]  # the rest repeats the logs
    say(f"[raydpo] job {submission_id}: {status}" + (f" ({reason.rstrip(':, ')})" if status != "SUCCEEDED" and reason else ""))
    return EXIT_CODES.get(status, 1)


if __name__ == "__main__":
    sys.exit(main())
