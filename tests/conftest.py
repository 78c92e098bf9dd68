"""Shared fixtures: one real local Ray for the session, a real MLflow store per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs (what CI has), stopped at the end of the session."""
    import ray

    # address="local": always a new instance, even where another Ray head runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """A real MLflow SQLite store of this test's own."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


SHARED = Path(__file__).resolve().parents[2] / "shared"
