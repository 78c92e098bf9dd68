"""The stages the jobs share: what ``prepare`` hands to every actor."""
from __future__ import annotations

from pathlib import Path

from raydpo.config import validate
from raydpo.models import write_tiny


def test_a_relative_model_folder_becomes_absolute(tmp_path, monkeypatch):
    """Ray Train workers run in folders of their own: a relative path would be taken for a hub id there."""
    from jobs import stages

    write_tiny(tmp_path / "models" / "m", hidden_size=32, num_layers=1, num_heads=2)
    monkeypatch.chdir(tmp_path)
    cfg = validate({"model": {"name_or_path": "models/m"}, "data": {"synthetic": {"rows": 10}},
                    "output_dir": str(tmp_path / "out")})
    prepared = stages.prepare(cfg)
    assert Path(prepared.model_path).is_absolute() and Path(prepared.model_path) == tmp_path / "models" / "m"
