"""Security: weights from safetensors only (a pickle runs code when loaded), remote code never
trusted, secrets never logged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from raydpo.config import ConfigError, validate
from raydpo.models import load_model, write_tiny

ROOT = Path(__file__).resolve().parents[1]


def pickled(tmp_path: Path) -> Path:
    """The tiny model saved as pytorch_model.bin (a pickle, as older checkpoints are), no safetensors."""
    folder = tmp_path / "pickled"
    tiny = write_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2)
    model = load_model(str(tiny))
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for f in tiny.glob("*token*"):
        (folder / f.name).write_bytes(f.read_bytes())
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    return folder


def config(model: Path, out: Path, **model_keys) -> dict:
    return {"model": {"name_or_path": str(model), **model_keys},
            "data": {"synthetic": {"rows": 10}}, "output_dir": str(out)}


def test_pickled_weights_are_refused_unless_allowed_then_converted_once(tmp_path):
    from jobs import stages

    folder = pickled(tmp_path)
    with pytest.raises(OSError):
        load_model(str(folder))  # the loader itself never reads a pickle
    with pytest.raises(ConfigError, match="model.allow_pickle"):
        stages.check_model(validate(config(folder, tmp_path / "out")))

    cfg = validate(config(folder, tmp_path / "out", allow_pickle=True))
    stages.check_model(cfg)
    prepared = stages.prepare(cfg)
    converted = Path(prepared.model_path)
    assert converted == tmp_path / "out" / "initial" and (converted / "model.safetensors").exists()
    original = load_model(str(folder), allow_pickle=True).state_dict()
    for name, value in load_model(str(converted)).state_dict().items():
        assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_remote_code_is_never_run(tmp_path, model_type):
    """A model whose config points at modeling code of its own: a known architecture loads with
    transformers' class, an unknown one is refused; the code never runs either way."""
    folder = write_tiny(tmp_path / "remote", hidden_size=32, num_layers=1, num_heads=2)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    if model_type == "llama":
        assert type(load_model(str(folder))).__module__.startswith("transformers.")
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            load_model(str(folder))
    assert not marker.exists()


def test_secrets_never_reach_mlflow(ray_local, tmp_path, mlflow_uri):
    """A token in the actors' environment and a password in a verifier's arguments: params and the
    logged config show ``***``, and the config file as written is not uploaded."""
    from jobs import stages

    secret = "s3cr3t-value"
    raw = config(Path("tiny"), tmp_path / "out")
    raw["online"] = {"synthetic": {"rows": 40}, "generator": {"env": {"HF_TOKEN": secret}},
                     "judge": {"type": "verifier", "verifier": "raydpo.online.verifiers:max_task",
                               "verifier_args": {"api_key": secret}},
                     "sampling": {"max_new_tokens": 4}}
    raw["data"] = {"max_length": 64, "max_prompt_length": 32}
    raw["tracking"] = {"uri": mlflow_uri, "experiment": "test", "system_metrics": False}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))
    cfg = validate(raw)
    tracker = stages.start_run(cfg, str(path), verbose=False, job="test", resumable=lambda out: False)
    tracker.finish("FINISHED", timeout=60)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["online.generator.env.HF_TOKEN"] == "***"
    assert run.data.params["online.judge.verifier_args.api_key"] == "***"
    assert all(secret not in v for v in run.data.params.values())
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert "config.yaml" in artifacts and path.name not in artifacts - {"config.yaml"}
    logged = Path(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert secret not in logged and "***" in logged
