"""The resource plan of a run whose pools all live at once (``raydpo iterate``): does the cluster
hold the generators, the judge's actors, the reference actors and the trainer together, now, once
the autoscaler has added nodes, or never?

- :class:`Pool`: ``count`` units (one actor or training worker each) of the same shape; a unit
  must fit on one node. Built from the settings objects: :func:`generator_pool`,
  :func:`judge_pool`, :func:`reference_pool`, :func:`trainer_pool`.
- :func:`plan`: the pure check on plain data (the nodes' total resources, the node types the
  autoscaler may add).
- :func:`check`: reads the live cluster (:func:`live_nodes`, :func:`autoscaler_node_types`), prints
  one ``[raydpo] resources: ...`` line and raises :class:`ResourcesNeverFit` (an ``InputError``:
  the job ends with the message, exit 2) when the pools can never be placed together; before that,
  a round would wait forever with no message.

It is a check, not Ray's scheduler: Ray places the units itself, later, and another job's actors
on the same cluster are not counted (the plan is of the cluster's total resources).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from raydpo.errors import InputError
from raydpo.progress import say

ACCELERATOR_PREFIX = "accelerator_type:"  # ray._common.utils.RESOURCE_CONSTRAINT_PREFIX
# What a unit placed with accelerator_type=X asks of a node (ray._common.utils.resources_from_ray_options
# and ScalingConfig both add it): the node must have the resource, a raylet adds 1 of it per GPU model.
ACCELERATOR_DEMAND = 0.001
_EPS = 1e-6  # Ray keeps resource amounts in fixed point to 1e-4: anything finer is rounding
# The cluster launcher's config as `ray up` writes it on the head node (where `ray job submit` runs
# the driver); the head's autoscaler reads it (`ray start --autoscaling-config=...`), and Ray Tune
# looks for the same file (ray.tune.execution.cluster_info).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


class ResourcesNeverFit(InputError):
    """The pools cannot be placed together on this cluster, even with every node the autoscaler may add."""


@dataclass(frozen=True)
class Pool:
    """``count`` units of ``cpus`` CPUs, ``gpus`` GPUs and ``resources`` each, on nodes with
    ``accelerator_type`` when set. ``strategy``: how the units spread (``STRICT_PACK``: all on one
    node; ``STRICT_SPREAD``: each on its own node; ``PACK``/``SPREAD`` are preferences, checked as
    free placement). ``keys``: the config keys that set it, for the advice of a plan that does not
    fit (``count``, ``CPU``, ``GPU``, ``resources``, ``accelerator_type``)."""

    name: str
    count: int
    cpus: float
    gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    keys: dict[str, str] = field(default_factory=dict)

    def unit(self) -> dict[str, float]:
        """What one unit asks of a node, as Ray counts it (zero amounts left out)."""
        need = {"CPU": self.cpus, "GPU": self.gpus, **self.resources}
        if self.accelerator_type:
            need[ACCELERATOR_PREFIX + self.accelerator_type] = ACCELERATOR_DEMAND
        return {k: v for k, v in need.items() if v > 0}


def _actor_keys(section: str, count_key: str = "num_actors") -> dict[str, str]:
    return {"count": f"{section}.{count_key}", "CPU": f"{section}.num_cpus", "GPU": f"{section}.num_gpus",
            "resources": f"{section}.resources", "accelerator_type": f"{section}.accelerator_type"}


def generator_pool(settings) -> Pool:
    """``online.generator`` (a ``GeneratorConfig``): its actors, as ``actors.generator.GeneratorPool`` places them."""
    return Pool("generators", settings.num_actors, settings.num_cpus, settings.num_gpus, dict(settings.resources or {}),
                settings.accelerator_type, keys=_actor_keys("online.generator"))


def judge_pool(settings) -> Pool | None:
    """``online.judge`` (a ``JudgeConfig``): the reward model's or the LLM judge's actors; None for a
    verifier, which runs in the driver."""
    if settings.type == "verifier":
        return None
    return Pool("judge", settings.num_actors, settings.num_cpus, settings.num_gpus, dict(settings.resources or {}),
                settings.accelerator_type, keys=_actor_keys("online.judge"))


def reference_pool(settings) -> Pool:
    """``reference`` (a ``ReferenceConfig``): the reference actors."""
    return Pool("reference", settings.num_actors, settings.num_cpus, settings.num_gpus, dict(settings.resources or {}),
                settings.accelerator_type, keys=_actor_keys("reference"))


def trainer_pool(settings) -> Pool:
    """``train`` (a ``TrainConfig``): the Ray Train workers, as ``raydpo.train.policy`` asks for them
    (``ScalingConfig``: CPU ``cpus_per_worker``, 1 GPU each with ``use_gpu``, ``resources``,
    ``accelerator_type``, ``placement_strategy``). Ray Train's coordinator asks for no resources
    when there are workers (``ScalingConfig._trainer_resources_not_none``)."""
    return Pool("trainer", settings.num_workers, settings.cpus_per_worker, 1.0 if settings.use_gpu else 0.0,
                dict(settings.resources or {}), settings.accelerator_type, settings.placement_strategy,
                keys={"count": "train.num_workers", "CPU": "train.cpus_per_worker", "GPU": "train.use_gpu",
                      "resources": "train.resources", "accelerator_type": "train.accelerator_type",
                      "strategy": "train.placement_strategy"})


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler may add: its resources per node, and at most ``max_count``
    nodes of it (None: no bound)."""

    name: str
    resources: dict[str, float]
    max_count: int | None


@dataclass(frozen=True)
class Plan:
    """``fits``: on the nodes there now; ``waits``: once the autoscaler has added ``added``
    (node type -> nodes); ``never``: not even then. ``message``: the one line that says so."""

    verdict: Literal["fits", "waits", "never"]
    message: str
    added: dict[str, int] = field(default_factory=dict)


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in need.items())


def _num(x: float) -> str:
    return f"{x:g}" if x != math.inf else "unbounded"


def _amount(resource: str, x: float) -> str:
    if resource in ("CPU", "GPU"):
        return f"{_num(x)} {resource}" + ("s" if x != 1 else "")
    return f"{_num(x)} {resource}"


def _shape(need: dict[str, float]) -> str:
    parts = [_amount(k, v) for k, v in need.items() if not k.startswith(ACCELERATOR_PREFIX)]
    parts += [f"on {k[len(ACCELERATOR_PREFIX):]}" for k in need if k.startswith(ACCELERATOR_PREFIX)]
    return ", ".join(parts) or "nothing"


def _nodes_phrase(n: int) -> str:
    return f"{n} node" + ("s" if n != 1 else "")


def plan(pools: Sequence[Pool], nodes: Sequence[dict[str, float]], node_types: Sequence[NodeType] = ()) -> Plan:
    """Whether ``pools`` can all be placed at once on ``nodes`` (each node's total resources, as
    ``ray.nodes()`` gives them, ``accelerator_type:X`` included), else once the autoscaler has
    added nodes of ``node_types`` (``()``: no autoscaler; where one runs whose node types the
    driver cannot see, :func:`plan_unknown_autoscaler`).

    First-fit decreasing: the units, largest first (GPUs, then CPUs, then the rest), each go on
    the first node with room, the nodes there now before any added one; a unit that fits none
    adds a node of the first type that holds it and has nodes left. ``STRICT_PACK`` pools are one
    unit of their summed shape; a ``STRICT_SPREAD`` pool puts each unit on another node. It is a
    check, not Ray's scheduler (which places each actor as it is created, with no look-ahead).
    ``never`` names the pools and the numbers: a resource the pools need more of in all than the
    nodes and the autoscaler's types can have; a unit bigger than every node and node type; else
    units that first-fit decreasing could not pack (bin packing: a cleverer packing may exist in
    rare cases, which Ray's own one-at-a-time placement would not find either)."""
    units: list[tuple[Pool, dict[str, float]]] = []
    for pool in pools:
        if pool.count <= 0:
            continue
        if pool.strategy == "STRICT_PACK":
            units.append((pool, {k: v * pool.count if not k.startswith(ACCELERATOR_PREFIX) else v
                                 for k, v in pool.unit().items()}))
        else:
            units += [(pool, pool.unit())] * pool.count
    units.sort(key=lambda u: (u[1].get("GPU", 0.0), u[1].get("CPU", 0.0), sum(u[1].values())), reverse=True)

    free = [dict(n) for n in nodes]
    origin: list[str | None] = [None] * len(free)  # None: there now; else the node type added
    holds: list[set[str]] = [set() for _ in free]  # the STRICT_SPREAD pools on each node
    left = {t.name: (t.max_count if t.max_count is not None else math.inf) for t in node_types}
    unplaced: list[tuple[Pool, dict[str, float]]] = []
    for pool, need in units:
        spread = pool.strategy == "STRICT_SPREAD"
        at = next((i for i, room in enumerate(free) if _fits(need, room) and not (spread and pool.name in holds[i])), None)
        if at is None:
            kind = next((t for t in node_types if left[t.name] >= 1 and _fits(need, t.resources)), None)
            if kind is None:
                unplaced.append((pool, need))
                continue
            left[kind.name] -= 1
            free.append(dict(kind.resources))
            origin.append(kind.name)
            holds.append(set())
            at = len(free) - 1
        for k, v in need.items():
            free[at][k] = free[at].get(k, 0.0) - v
        if spread:
            holds[at].add(pool.name)

    added: dict[str, int] = {}
    for name in origin:
        if name is not None:
            added[name] = added.get(name, 0) + 1
    if unplaced:
        return Plan("never", _never(pools, nodes, node_types, unplaced))
    head = f"{_demand(pools)} on {_capacity(_totals(nodes), len(nodes))}"
    if not added:
        return Plan("fits", f"{head}: fits")
    what = ", ".join(f"{n} x {name}" for name, n in added.items())
    return Plan("waits", f"{head}: waits for the autoscaler to add {what}", added)


def plan_unknown_autoscaler(pools: Sequence[Pool], nodes: Sequence[dict[str, float]]) -> Plan:
    """:func:`plan` where an autoscaler runs whose node types the driver cannot see: a plan that
    fits the nodes there now ``fits``; anything else ``waits`` (it cannot be checked)."""
    now = plan(pools, nodes, ())
    if now.verdict == "fits":
        return now
    return Plan("waits", f"{_demand(pools)} on {_capacity(_totals(nodes), len(nodes))}: waits for the autoscaler "
                         "to add nodes (which node types it may add is not visible to the job, so this is not checked)")


def _totals(nodes: Sequence[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _demand(pools: Sequence[Pool]) -> str:
    """``generators 2 x (1 CPU), trainer 1 x (1 CPU, 1 GPU)``."""
    return ", ".join(f"{p.name} {p.count} x ({_shape(p.unit())})" for p in pools if p.count > 0 and p.unit()) or "nothing"


def _capacity(have: dict[str, float], n_nodes: int) -> str:
    shown = [_amount(k, have[k]) for k in ("CPU", "GPU") if have.get(k)]
    return "the cluster's " + (", ".join(shown) or "nothing") + f" ({_nodes_phrase(n_nodes)})"


def _addable(node_types: Sequence[NodeType], resource: str) -> float:
    """The most of ``resource`` the autoscaler may add (inf where a type holding it is unbounded)."""
    total = 0.0
    for t in node_types:
        amount = t.resources.get(resource, 0.0)
        if amount > 0:
            total += math.inf if t.max_count is None else amount * t.max_count
    return total


def _never(pools: Sequence[Pool], nodes: Sequence[dict[str, float]], node_types: Sequence[NodeType],
           unplaced: list[tuple[Pool, dict[str, float]]]) -> str:
    """Why: a resource the pools need more of than the cluster can ever have (the sums), else a
    unit bigger than every node and node type, else units that did not pack."""
    have, n = _totals(nodes), len(nodes)
    largest = max(nodes, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    grows = " and the autoscaler may add {}" if node_types else ""
    for resource in sorted({k for p in pools for k in p.unit() if not k.startswith(ACCELERATOR_PREFIX)},
                           key=lambda k: (k not in ("CPU", "GPU"), k)):
        using = [p for p in pools if p.count > 0 and p.unit().get(resource, 0.0) > 0]
        need = sum(p.count * p.unit()[resource] for p in using)
        cap, more = have.get(resource, 0.0), _addable(node_types, resource)
        if need > cap + more + _EPS:
            terms = " + ".join(f"{p.name} {p.count} x {_amount(resource, p.unit()[resource])}" for p in using)
            return (f"never fits: {terms} = {_amount(resource, need)}; the cluster has {_amount(resource, cap)} "
                    f"({_nodes_phrase(n)})" + (grows.format(_amount(resource, more)) if more else "")
                    + f": {_advice(using, resource)}")
    pool, need = unplaced[0]
    accel = [k for k in need if k.startswith(ACCELERATOR_PREFIX)]
    models = sorted({k[len(ACCELERATOR_PREFIX):] for r in [*nodes, *(t.resources for t in node_types)] for k in r
                     if k.startswith(ACCELERATOR_PREFIX)})
    if accel and not any(accel[0] in r for r in [*nodes, *(t.resources for t in node_types)]):
        return (f"never fits: {pool.name} asks for {accel[0][len(ACCELERATOR_PREFIX):]} GPUs "
                f"({pool.keys.get('accelerator_type', 'accelerator_type')}); the cluster's GPUs"
                + (" (its nodes and the node types the autoscaler adds)" if node_types else "")
                + " are " + (", ".join(models) if models else "of no known model")
                + f": set {pool.keys.get('accelerator_type', 'accelerator_type')} to one of those, or leave it unset")
    shapes = [*nodes, *(t.resources for t in node_types)]
    if not any(_fits(need, r) for r in shapes):
        whole = "all of its units on one node (STRICT_PACK)" if pool.strategy == "STRICT_PACK" else "one unit"
        types = ", ".join(f"{t.name}: {_shape(_cpu_gpu(t.resources))}" for t in node_types)
        return (f"never fits: {pool.name} needs {_shape(need)} for {whole}; no node has that much "
                f"(the largest: {_shape(_cpu_gpu(largest))})"
                + (f", nor a node type the autoscaler adds ({types})" if node_types else "")
                + f": {_advice([pool], None)}")
    names = sorted({p.name for p, _ in unplaced})
    return (f"never fits: {_demand(pools)} do not pack onto {_capacity(have, n)}"
            + (" and the nodes the autoscaler may add" if node_types else "")
            + f" ({len(unplaced)} unit(s) of {', '.join(names)} left over, first-fit decreasing"
            + (", one unit per node for STRICT_SPREAD" if any(p.strategy == "STRICT_SPREAD" for p, _ in unplaced) else "")
            + f"): {_advice([p for p in pools if p.name in names], None)}"
            + "".join(f", or {p.keys['strategy']}: SPREAD" for p in pools
                      if p.name in names and p.strategy.startswith("STRICT") and "strategy" in p.keys))


def _cpu_gpu(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU")}


def _advice(pools: Sequence[Pool], resource: str | None) -> str:
    """``lower reference.num_cpus or train.cpus_per_worker (or reference.num_actors, ...), or give
    the cluster more CPUs``."""
    if resource is None:
        per_unit = [p.keys.get(k) for p in pools for k in ("CPU", "GPU") if p.unit().get(k)]
        what = "bigger nodes"
    elif resource in ("CPU", "GPU"):
        per_unit = [p.keys.get(resource) for p in pools]
        what = f"more {resource}s"
    else:
        per_unit = [f"{p.keys['resources']}.{resource}" if "resources" in p.keys else None for p in pools]
        what = f"more {resource}"
    counts = [p.keys.get("count") for p in pools]
    per_unit, counts = [k for k in per_unit if k], [k for k in counts if k]
    return (f"lower {' or '.join(per_unit) or 'what each unit asks for'}"
            + (f" (or {', '.join(counts)})" if counts else "") + f", or give the cluster {what}")


# --- the live cluster -------------------------------------------------------------------------


def live_nodes() -> list[dict[str, float]]:
    """The alive nodes' total resources (``ray.nodes()``), ``accelerator_type:X`` included."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]


def node_types_from_launcher(config: dict) -> list[NodeType] | None:
    """The worker node types of a cluster launcher config (``available_node_types``): resources
    per node, and ``max_workers`` (the type's, else the cluster's; the cluster's cap on all types
    together is not applied, which errs towards waiting). The head's type is left out (it runs
    already), and so is a type of ``max_workers: 0``. ``ray up`` fills in the resources of a
    cloud's instance type (``resources: {}`` in the user's file), so the config on the head has
    them; where a type that may be added has none, its nodes are unknown: None."""
    head = config.get("head_node_type")
    default_max = config.get("max_workers")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        most = spec.get("max_workers", default_max)
        if name == head or most == 0:
            continue
        if not spec.get("resources"):
            return None
        out.append(NodeType(name, {k: float(v) for k, v in spec["resources"].items()},
                            None if most is None else int(most)))
    return out


def autoscaler_node_types(launcher_config: str = LAUNCHER_CONFIG) -> list[NodeType] | None:
    """The node types the autoscaler may add, as far as a driver can learn them (Ray 2.60):

    1. Ray's published cluster config, ``ray._private.state.state.get_cluster_config()`` (the
       autoscaler's node groups: resources, max_count; -1 for no bound), which Ray Train and Ray
       Data read for the same purpose. It is in the GCS only where an autoscaler reported it
       (``ReportClusterConfig``); Ray 2.60's own autoscalers (v1 and v2, launcher and KubeRay) do
       not.
    2. The cluster launcher's config on the head node (``launcher_config``, ``ray up`` writes it,
       the head's autoscaler reads it), readable where the driver runs on the head (``ray job
       submit``); None where a type in it has no resources (:func:`node_types_from_launcher`).
    3. Otherwise: ``None`` where an autoscaler runs whose types are unknown (the v2 autoscaler's
       flag in the GCS, or the v1 autoscaler's status naming node types that are not the
       read-only mirrors of the nodes there), else ``[]`` (none: nothing will be added).

    A type's max count is not lessened by the nodes of that type already running (a driver
    cannot tell reliably which type a running node is): the check errs towards waiting, never
    towards a wrong error."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, None if g.max_count < 0 else g.max_count)
                for g in config.node_group_configs if g.resources and g.max_count != 0]
    path = Path(launcher_config).expanduser()
    if path.is_file():
        import yaml

        return node_types_from_launcher(yaml.safe_load(path.read_text()) or {})
    return None if _autoscaler_runs() else []


def _autoscaler_runs() -> bool:
    """Whether an autoscaler with node types of its own runs (see :func:`autoscaler_node_types`)."""
    import json

    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        return True
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return any(kind != format_readonly_node_type(node) for node, kind in mapping.items())


def check(pools: Sequence[Pool | None], out: Callable[[str], None] = say,
          launcher_config: str = LAUNCHER_CONFIG) -> Plan:
    """Plans ``pools`` (None entries skipped: a judge without actors) on the live cluster, prints
    ``[raydpo] resources: ...`` with ``out``, and returns the plan; raises :class:`ResourcesNeverFit`
    when it never fits. Needs ``ray.init`` first."""
    placed = [p for p in pools if p is not None]
    nodes = live_nodes()
    types = autoscaler_node_types(launcher_config)
    result = plan_unknown_autoscaler(placed, nodes) if types is None else plan(placed, nodes, types)
    if result.verdict == "never":
        raise ResourcesNeverFit(f"resources: {result.message}")
    out(f"[raydpo] resources: {result.message}")
    return result
