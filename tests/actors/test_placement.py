"""The resource plan (actors/placement.py): the pure planner on hand-built clusters, then the live
reading on real Ray: a local Ray started with declared resources (CPUs, GPUs, an accelerator type
and a custom resource that this machine does not have: Ray schedules on them all the same), and
the fake autoscaler's cluster of tests/ray_cluster.py.

The live tests run their driver in a subprocess: one process holds one Ray connection, and the
session's ``ray_local`` (2 CPUs, nothing else) must stay as it is for the other tests."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actors.placement import (NodeType, Pool, ResourcesNeverFit, generator_pool, judge_pool, node_types_from_launcher,
                              plan, plan_unknown_autoscaler, reference_pool, trainer_pool)
from raydpo.config import GeneratorConfig, JudgeConfig, ReferenceConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def cpu_pools(generators: float = 1, trainer: float = 1, reference: float = 1) -> list[Pool]:
    return [generator_pool(GeneratorConfig(num_cpus=generators)), trainer_pool(TrainConfig(cpus_per_worker=trainer)),
            reference_pool(ReferenceConfig(num_cpus=reference))]


# --- the pure planner -----------------------------------------------------------------------


def test_fits_on_the_nodes_there_now():
    result = plan(cpu_pools(), [{"CPU": 2}, {"CPU": 1}])
    assert result.verdict == "fits" and result.added == {}
    assert result.message == ("generators 1 x (1 CPU), trainer 1 x (1 CPU), reference 1 x (1 CPU) "
                              "on the cluster's 3 CPUs (2 nodes): fits")


def test_never_fits_names_the_pools_the_sum_and_the_keys():
    result = plan(cpu_pools(), [{"CPU": 2}])
    assert result.verdict == "never"
    assert result.message.startswith(
        "never fits: generators 1 x 1 CPU + trainer 1 x 1 CPU + reference 1 x 1 CPU = 3 CPUs; "
        "the cluster has 2 CPUs (1 node): lower online.generator.num_cpus or train.cpus_per_worker or reference.num_cpus "
        "(or online.generator.num_actors, train.num_workers, reference.num_actors)")


def test_waits_for_the_autoscaler_and_says_which_nodes():
    gpu = NodeType("worker.gpu", {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}, max_count=4)
    pools = [generator_pool(GeneratorConfig(num_gpus=1)), trainer_pool(TrainConfig(num_workers=2, use_gpu=True,
                                                                                   batch_size=32, micro_batch_size=16)),
             reference_pool(ReferenceConfig())]
    result = plan(pools, [{"CPU": 8}], [NodeType("worker.cpu", {"CPU": 4}, 1), gpu])
    # 3 GPU units, one GPU per node: three GPU nodes; the reference's CPU goes on the head.
    assert result.verdict == "waits" and result.added == {"worker.gpu": 3}
    assert result.message.endswith("on the cluster's 8 CPUs (1 node): waits for the autoscaler to add 3 x worker.gpu")


def test_the_autoscalers_max_count_bounds_what_it_adds():
    pools = [trainer_pool(TrainConfig(num_workers=4, use_gpu=True, batch_size=32, micro_batch_size=8))]
    result = plan(pools, [{"CPU": 8}], [NodeType("worker.gpu", {"CPU": 8, "GPU": 1}, max_count=2)])
    assert result.verdict == "never"
    assert result.message.startswith("never fits: trainer 4 x 1 GPU = 4 GPUs; the cluster has 0 GPUs (1 node) "
                                     "and the autoscaler may add 2 GPUs: lower train.use_gpu (or train.num_workers)")
    unbounded = plan(pools, [{"CPU": 8}], [NodeType("worker.gpu", {"CPU": 8, "GPU": 1}, max_count=None)])
    assert unbounded.verdict == "waits" and unbounded.added == {"worker.gpu": 4}


def test_a_unit_bigger_than_any_node_never_fits_while_the_sum_does():
    pools = [generator_pool(GeneratorConfig(num_cpus=1, num_gpus=2, tensor_parallel_size=2))]  # TP over its 2 GPUs
    result = plan(pools, [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}])
    assert result.verdict == "never"
    assert result.message == ("never fits: generators needs 1 CPU, 2 GPUs for one unit; no node has that much "
                              "(the largest: 8 CPUs, 1 GPU): lower online.generator.num_cpus or online.generator.num_gpus "
                              "(or online.generator.num_actors), or give the cluster bigger nodes")


def test_units_that_do_not_pack_never_fit():
    # 3 units of 2 CPUs on two 3-CPU nodes: 6 CPUs of 6, but each node holds one unit only.
    result = plan([generator_pool(GeneratorConfig(num_actors=3, num_cpus=2))], [{"CPU": 3}, {"CPU": 3}])
    assert result.verdict == "never"
    assert "do not pack onto the cluster's 6 CPUs (2 nodes)" in result.message
    assert "1 unit(s) of generators left over" in result.message


def test_custom_resources_are_placed_and_summed():
    train = TrainConfig(num_workers=2, resources={"trainer_node": 1}, batch_size=32, micro_batch_size=16)
    assert plan([trainer_pool(train)], [{"CPU": 4}, {"CPU": 1, "trainer_node": 1}, {"CPU": 1, "trainer_node": 1}]).verdict == "fits"
    result = plan([trainer_pool(train)], [{"CPU": 4}, {"CPU": 1, "trainer_node": 1}])
    assert result.verdict == "never"
    assert result.message.startswith("never fits: trainer 2 x 1 trainer_node = 2 trainer_node; the cluster has "
                                     "1 trainer_node (2 nodes): lower train.resources.trainer_node (or train.num_workers)")


def test_accelerator_types():
    a100 = {"CPU": 8, "GPU": 1, "accelerator_type:A100": 1}
    l4 = {"CPU": 8, "GPU": 1, "accelerator_type:L4": 1}
    pool = generator_pool(GeneratorConfig(num_gpus=1, accelerator_type="A100"))
    assert plan([pool], [l4, a100]).verdict == "fits"
    # Two A100 units, one A100 node: the L4 node's free GPU does not count.
    two = generator_pool(GeneratorConfig(num_actors=2, num_gpus=1, accelerator_type="A100"))
    assert plan([two], [l4, a100]).verdict == "never"
    assert plan([two], [l4, a100], [NodeType("a100", a100, 1)]).added == {"a100": 1}
    missing = plan([pool], [l4], [NodeType("l4", l4, 3)])
    assert missing.verdict == "never"
    assert missing.message == ("never fits: generators asks for A100 GPUs (online.generator.accelerator_type); the "
                               "cluster's GPUs (its nodes and the node types the autoscaler adds) are L4: set "
                               "online.generator.accelerator_type to one of those, or leave it unset")


def test_strict_strategies():
    train = TrainConfig(num_workers=2, use_gpu=True, placement_strategy="STRICT_SPREAD", batch_size=32, micro_batch_size=16)
    one_node = [{"CPU": 8, "GPU": 2}]
    assert plan([trainer_pool(train.model_copy(update={"placement_strategy": "PACK"}))], one_node).verdict == "fits"
    spread = plan([trainer_pool(train)], one_node)
    assert spread.verdict == "never" and spread.message.endswith("or train.placement_strategy: SPREAD")
    packed = trainer_pool(train.model_copy(update={"placement_strategy": "STRICT_PACK"}))
    assert plan([packed], [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]).message.startswith(
        "never fits: trainer needs 2 CPUs, 2 GPUs for all of its units on one node (STRICT_PACK)")


def test_pools_without_actors_or_resources():
    assert judge_pool(JudgeConfig(type="verifier", verifier="raydpo.online.verifiers:max_task")) is None
    judge = judge_pool(JudgeConfig(type="reward_model", model="m", num_actors=2, num_cpus=0.5))
    assert (judge.count, judge.cpus, judge.keys["CPU"]) == (2, 0.5, "online.judge.num_cpus")
    free = generator_pool(GeneratorConfig(num_cpus=0))
    assert plan([free], [{"CPU": 1}]).message == "nothing on the cluster's 1 CPU (1 node): fits"


def test_an_autoscaler_whose_types_are_unknown_waits_unchecked():
    assert plan_unknown_autoscaler(cpu_pools(), [{"CPU": 4}]).verdict == "fits"
    result = plan_unknown_autoscaler(cpu_pools(), [{"CPU": 2}])
    assert result.verdict == "waits" and "is not visible to the job, so this is not checked" in result.message


def test_launcher_config_node_types():
    import yaml

    config = yaml.safe_load((ROOT / "configs/cluster/aws.yaml").read_text())
    # As `ray up` writes it on the head: the provider filled in the instance types' resources.
    config["available_node_types"]["worker.gpu"]["resources"] = {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}
    assert node_types_from_launcher(config) == [
        NodeType("worker.gpu", {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, 4)]
    # The user's file, before `ray up` fills the resources in: the GPU nodes are unknown, not absent.
    assert node_types_from_launcher(yaml.safe_load((ROOT / "configs/cluster/aws.yaml").read_text())) is None


# --- the live cluster -----------------------------------------------------------------------


def run_driver(code: str, timeout: float = 180, env: dict[str, str] | None = None) -> dict:
    """``code`` in a fresh Python (this repository on its path); returns the JSON it prints on a
    line of its own after ``RESULT`` (Ray's driver log lines come on the same stdout)."""
    import os

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    found = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert found, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(found[-1])


def test_live_reading_of_the_session_ray(ray_local, tmp_path):
    """The session's local Ray (2 CPUs, no autoscaler): read, planned, one line or the user's error."""
    from actors.placement import autoscaler_node_types, check, live_nodes

    no_file = str(tmp_path / "absent.yaml")  # no cluster launcher config on this "head"
    assert [n["CPU"] for n in live_nodes()] == [2.0]
    assert autoscaler_node_types(no_file) == []  # Ray's read-only monitor mirrors the node: it adds nothing
    lines: list[str] = []
    result = check([generator_pool(GeneratorConfig()), None, trainer_pool(TrainConfig())], lines.append, no_file)
    assert result.verdict == "fits"
    assert lines == ["[raydpo] resources: generators 1 x (1 CPU), trainer 1 x (1 CPU) on the cluster's 2 CPUs (1 node): fits"]
    with pytest.raises(ResourcesNeverFit, match=r"^resources: never fits: generators 1 x 1 CPU \+ trainer 1 x 1 CPU "
                                                r"\+ reference 1 x 1 CPU = 3 CPUs; the cluster has 2 CPUs \(1 node\)"):
        check(cpu_pools(), lines.append, no_file)
    assert len(lines) == 1


@pytest.mark.slow
def test_live_cluster_with_declared_resources(tmp_path):
    """A local Ray with 4 CPUs, 2 GPUs, an A100 and a custom resource, none of them real: the plan
    reads them; a fitting plan's units are then placed by Ray itself (each actor answers); a plan
    too big raises the user's error; an autoscaler's published cluster config (reported here as
    an autoscaler would, ``ReportClusterConfig``) turns a plan too big for the nodes into a wait."""
    out = run_driver(f"""
        import json, ray
        from actors import placement
        from actors.placement import ResourcesNeverFit
        from raydpo.config import GeneratorConfig, ReferenceConfig, TrainConfig

        ray.init(address="local", num_cpus=4, num_gpus=2, resources={{"accelerator_type:A100": 1, "trainer_node": 1}},
                 include_dashboard=False, logging_level="ERROR")
        lines = []
        nodes = placement.live_nodes()
        no_file = {str(tmp_path / 'absent.yaml')!r}
        types = placement.autoscaler_node_types(no_file)
        pools = [placement.generator_pool(GeneratorConfig(num_cpus=1, num_gpus=1, accelerator_type="A100")),
                 placement.trainer_pool(TrainConfig(cpus_per_worker=1, use_gpu=True, resources={{"trainer_node": 1}})),
                 placement.reference_pool(ReferenceConfig(num_cpus=2))]
        fits = placement.check(pools, lines.append, no_file)

        @ray.remote
        class Unit:
            def ping(self):
                return 1
        actors = [Unit.options(num_cpus=p.cpus, num_gpus=p.gpus, resources=p.resources,
                               accelerator_type=p.accelerator_type).remote() for p in pools]
        placed = sum(ray.get([a.ping.remote() for a in actors], timeout=60))
        for a in actors:
            ray.kill(a)
        try:
            placement.check([*pools, placement.reference_pool(ReferenceConfig(num_cpus=1))], lines.append, no_file)
            error = None
        except ResourcesNeverFit as e:
            error = str(e)

        from ray._raylet import GcsClient
        from ray.core.generated import autoscaler_pb2
        group = autoscaler_pb2.NodeGroupConfig(name="gpu-node", min_count=0, max_count=2, resources={{"CPU": 4, "GPU": 1}})
        GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(
            autoscaler_pb2.ClusterConfig(node_group_configs=[group]).SerializeToString())
        published = placement.autoscaler_node_types(no_file)
        waits = placement.check([*pools, placement.generator_pool(GeneratorConfig(num_actors=2, num_gpus=1))],
                                lines.append, no_file)
        print("RESULT", json.dumps({{"nodes": nodes, "types": types, "fits": fits.verdict, "placed": placed, "error": error,
                          "published": [[t.name, t.resources, t.max_count] for t in published],
                          "waits": [waits.verdict, waits.added], "lines": lines}}), flush=True)
    """)
    assert len(out["nodes"]) == 1
    node = out["nodes"][0]
    assert (node["CPU"], node["GPU"], node["accelerator_type:A100"], node["trainer_node"]) == (4, 2, 1, 1)
    assert out["types"] == []  # no autoscaler: Ray's read-only monitor mirrors the node, adds nothing
    assert out["fits"] == "fits" and out["placed"] == 3
    assert out["lines"][0] == ("[raydpo] resources: generators 1 x (1 CPU, 1 GPU, on A100), trainer 1 x (1 CPU, 1 GPU, "
                               "1 trainer_node), reference 1 x (2 CPUs) on the cluster's 4 CPUs, 2 GPUs (1 node): fits")
    assert out["error"].startswith("resources: never fits: generators 1 x 1 CPU + trainer 1 x 1 CPU + reference 1 x 2 CPUs "
                                   "+ reference 1 x 1 CPU = 5 CPUs; the cluster has 4 CPUs (1 node)")
    assert out["published"] == [["gpu-node", {"CPU": 4.0, "GPU": 1.0}, 2]]
    assert out["waits"] == ["waits", {"gpu-node": 2}]
    assert out["lines"][1].endswith("waits for the autoscaler to add 2 x gpu-node")


@pytest.mark.slow
def test_fake_autoscaler_cluster(tmp_path):
    """Ray's fake multi-node autoscaler (v1, a ``trainer`` node type of 1 CPU and 1 ``trainer_node``,
    0 to 2 nodes): its node types come from the launcher config the head's autoscaler reads; two
    trainer workers wait for two nodes, which the autoscaler then adds (Ray places the units); a
    third never fits; without the config file, the running autoscaler is recognised and the plan
    waits unchecked."""
    from tests.ray_cluster import autoscaling_cluster

    cluster = autoscaling_cluster(tmp_path)
    try:
        cluster.wait_for_nodes(1)
        config = tmp_path / "cluster.json"  # the config the head's autoscaler was started with
        out = run_driver(f"""
            import json, ray
            from actors import placement
            from actors.placement import ResourcesNeverFit
            from raydpo.config import TrainConfig

            ray.init(address={cluster.address!r}, logging_level="ERROR")
            lines = []
            train = TrainConfig(num_workers=2, resources={{"trainer_node": 1}}, batch_size=32, micro_batch_size=16)
            waits = placement.check([placement.trainer_pool(train)], lines.append, {str(config)!r})
            unknown = placement.check([placement.trainer_pool(train)], lines.append, {str(tmp_path / 'absent.yaml')!r})
            try:
                placement.check([placement.trainer_pool(train.model_copy(update={{"num_workers": 3}}))], lines.append,
                                {str(config)!r})
                error = None
            except ResourcesNeverFit as e:
                error = str(e)

            @ray.remote(num_cpus=1, resources={{"trainer_node": 1}})
            class Unit:
                def ping(self):
                    return 1
            actors = [Unit.remote() for _ in range(2)]
            placed = sum(ray.get([a.ping.remote() for a in actors], timeout=150))
            print("RESULT", json.dumps({{"waits": [waits.verdict, waits.added], "unknown": unknown.verdict, "error": error,
                              "placed": placed, "lines": lines}}), flush=True)
        """, timeout=240, env={"RAY_ADDRESS": cluster.address})
    finally:
        cluster.stop()
    assert out["waits"] == ["waits", {"trainer": 2}]
    assert out["lines"][0] == ("[raydpo] resources: trainer 2 x (1 CPU, 1 trainer_node) on the cluster's 2 CPUs "
                               "(1 node): waits for the autoscaler to add 2 x trainer")
    assert out["unknown"] == "waits"
    assert out["error"] == ("resources: never fits: trainer 3 x 1 trainer_node = 3 trainer_node; the cluster has "
                            "0 trainer_node (1 node) and the autoscaler may add 2 trainer_node: lower "
                            "train.resources.trainer_node (or train.num_workers), or give the cluster more trainer_node")
    assert out["placed"] == 2
