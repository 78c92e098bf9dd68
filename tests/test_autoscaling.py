"""Autoscaling without a cloud: Ray's fake multi-node provider (``fake_multinode``, what
``ray.cluster_utils.AutoscalingCluster`` configures) starts and stops real raylets on this machine.

The head has no trainer node; a training job submitted with ``raydpo submit`` asks for workers with
a custom resource only the ``trainer`` node type has, so the autoscaler adds two such nodes, the
job completes on them, and the idle nodes are removed. The timings are printed (run with ``-s``)
and recorded in docs/benchmarks.md.

``AutoscalingCluster`` itself is not used: its ``start`` and ``shutdown`` call Ray's machine-wide stop,
which stops every Ray process on the machine, and the example config it reads is not in the wheel.
The head here is started as it does (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config``),
with its own temp dir and ports, and stopped by pid with the nodes the autoscaler started.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from tests.ray_cluster import LocalCluster

IDLE_TIMEOUT_MIN = 0.1  # 6 s: how long a node stays idle before the autoscaler removes it


def fake_cluster_config(gcs_address: str, head_cpus: int) -> dict:
    """A cluster launcher config for the fake provider: a head and a ``trainer`` node type (1 CPU,
    1 ``trainer_node``) from 0 to 2 nodes."""
    return {
        "cluster_name": "raydpo-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "trainer": {"resources": {"CPU": 1, "trainer_node": 1, "object_store_memory": 150 * 2**20},
                        "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    """The head (2 CPUs, no trainer node) with the fake provider's autoscaler; stopped by pid."""
    from tests.conftest import free_port

    gcs_port = free_port()  # chosen first: the config tells the provider's nodes where to join
    config = tmp_path_factory.mktemp("autoscaler") / "cluster.json"
    config.write_text(json.dumps(fake_cluster_config(f"127.0.0.1:{gcs_port}", head_cpus=2)))
    cluster = LocalCluster(head_cpus=2, gcs_port=gcs_port, head_args=["--autoscaling-config", str(config)],
                           env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    try:
        cluster.wait_for_nodes(1)
        yield cluster
    finally:
        cluster.stop()


def test_a_job_that_needs_trainer_nodes_scales_up_and_down(autoscaling, tmp_path, capsys):
    """Two train workers that each need a ``trainer_node``: the autoscaler starts two trainer
    nodes, the job succeeds on them, and once their workers are gone the nodes are removed.
    Timings by the wall clock, from Ray's state API where it keeps them (node start and end, the
    placement group's request), else from polling once a second (the workers' end)."""
    from ray.util.state import list_actors, list_nodes, list_placement_groups

    from jobs.submit import main

    address = autoscaling.dashboard
    working: list[tuple[float, int]] = []  # (time, alive train workers)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                alive = list_actors(address=address, raise_on_missing_output=False,
                                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                working.append((time.time(), len(alive)))
            except Exception:  # the dashboard busy: try again
                pass
            stop.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    sets = [f"output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=test", f"reference.cache_dir={tmp_path / 'ref-cache'}", "tracking.log_model=false",
            "data.synthetic.rows=200", "data.eval_fraction=0.0", "train.max_steps=4", "train.num_workers=2",
            "train.batch_size=16", "train.micro_batch_size=8", "train.resources={trainer_node: 1}",
            "train.log_every=1", "train.eval_every=0",
            "loss.reference_free=true"]  # no reference actors: the scaling is the train workers'
    t0 = time.time()
    watcher.start()
    code = main(["configs/quickstart.yaml", "--address", address, "--follow", *(f"--set={s}" for s in sets)])
    job_end = time.time()
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "step 4/4 loss" in out
    deadline = time.monotonic() + 300
    while len(autoscaling.alive_nodes()) > 1 and time.monotonic() < deadline:  # the idle nodes removed
        time.sleep(1.0)
    stop.set()
    watcher.join(timeout=10)

    nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    trainers = [n for n in nodes if "trainer_node" in n.resources_total]
    assert len(trainers) == 2 and all(n.state == "DEAD" for n in trainers), nodes  # started, then removed
    assert [n.state for n in nodes if n.is_head_node] == ["ALIVE"]
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          raise_on_missing_output=False)
    assert {w.node_id for w in workers} == {n.node_id for n in trainers}  # one worker on each trainer node
    groups = [g for g in list_placement_groups(address=address, detail=True, raise_on_missing_output=False)
              if any("trainer_node" in b["unit_resources"] for b in g.bundles)]
    asked = min(int(g.stats["creation_request_received_ns"]) for g in groups) / 1e9  # int64: a string in JSON
    last_work = max(t for t, n in working if n)
    done = next(t for t, n in working if t > last_work)  # the trainer nodes' last work ended
    up = sorted(n.start_time_ms / 1000 for n in trainers)
    removed = max(n.end_time_ms / 1000 for n in trainers)
    assert asked < up[0] and done < removed
    timings = {"workers_asked_for": asked - t0, "first_node_up": up[0] - t0, "second_node_up": up[1] - t0,
               "workers_done": done - t0, "nodes_removed": removed - t0, "job_end": job_end - t0,
               "scale_up": up[1] - asked, "scale_down_after_idle": removed - done, "idle_timeout": IDLE_TIMEOUT_MIN * 60}
    print("\nautoscaling timings (s; events from submit):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
