"""Weights from one sender to N receivers over a torch.distributed process group of their own
(the trainer's new policy reaches the generators without a trip through disk).

Plain torch, no Ray: the sender is rank 0 of a Ray Train worker group that already has a default
``torch.distributed`` group, so this module never touches the default group. The sender hosts a
``TCPStore`` and every sync builds a process group directly on it (``ProcessGroupGloo`` on CPUs,
``ProcessGroupNCCL`` on CUDA: the backend follows the sender's device).

One sync, in order:

1. ``WeightSender.open(n_receivers, device, timeout_s)`` hosts the store on this node's IP and a
   port the kernel picks; its ``endpoint`` (picklable) goes to the receivers.
2. Each ``WeightReceiver(endpoint, rank)`` (ranks 1..n) marks itself joined in the store and
   builds its side of the group; ``send`` waits for every mark first, so a receiver that never
   comes is named (``receiver ranks [2] did not join``) instead of a bare rendezvous timeout.
3. ``send(named_tensors)`` packs the tensors, in the order given, into flat byte buckets of about
   ``bucket_bytes``; before each bucket its metadata (names, dtypes, shapes, byte offsets) goes
   through the store as JSON, so a receiver needs no knowledge of the model and the sender can
   stream (a ZeRO-3 gather yields one parameter at a time). Then one broadcast per bucket.
4. After the last bucket the sender publishes an end marker and waits for every receiver's
   acknowledgement (``ack/<rank>``, set when its iterator reaches the end).

Transport of the buckets (``WeightSender.transport``): NCCL's broadcast on GPUs; on CPUs, where
every receiver can open the sender's shared memory (one host: the online loop's usual CPU layout),
the buckets go through a shared-memory arena the sender keeps across syncs and the gloo broadcast
carries only each bucket's go signal (``shm``: ``memfd`` buffers that receivers open through
``/proc/<pid>/fd``; nothing is left behind when the sender's process dies); otherwise gloo broadcasts the buckets themselves
(``gloo``, TCP). Why: gloo over loopback TCP moved 0.3-0.8 GB/s on the 2-core test machine (two
kernel copies per receiver, CPU-bound), a write into pages written before ~8 GB/s.

Group lifetime: one group per sync (``open`` .. ``close``). Forming it costs ~2 ms once the
receivers have joined (``SyncStats.setup_s``, 3 ranks on loopback), nothing next to a model's
transfer, and a group made per sync needs no repair after a failure: a receiver that died, its
replacement, a sender restarted by Ray Train all simply join the next one.

Failures are errors within ``timeout_s`` of the step that stalls, never hangs: every store wait
and every collective runs under it. A receiver that dies mid-sync breaks the sender's next
broadcast (its socket closes); the sender then publishes an abort marker, tears its group down
(the other receivers fail at once) and raises :class:`WeightSyncError` naming the bucket and each
receiver's buckets taken. A receiver that stalls makes the sender's broadcast or its wait for
acknowledgements time out, naming the ranks that did not acknowledge. A sender that dies closes
the store: receivers fail at once; one that stalls between buckets makes them time out, naming
the bucket they waited for.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

# 256 MiB per bucket. On CPU gloo the cost per broadcast is a few round trips (~1 ms on loopback),
# so buckets above ~16 MiB already run at the link's speed (64 MiB buckets moved 0.84 GiB/s, 256 MiB
# 1.95 GiB/s between 2 processes on the test machine); a bucket is a second copy of that many bytes
# on the sender and on every receiver, which 256 MiB keeps small next to any model. Over shm the
# size only sets how often receivers get a go signal. On GPUs NCCL reaches its bus bandwidth from
# ~64 MiB (vLLM's packed NCCL transfer uses 2 x 1 GiB). A tensor larger than the bucket goes alone
# in a bucket of its own size.
DEFAULT_BUCKET_BYTES = 256 * 2**20
_ALIGN = 64  # bytes: each tensor starts at a multiple of 64, so a view of any dtype is aligned


class WeightSyncError(RuntimeError):
    """A weight sync failed or timed out; the message names the step, the bucket and the ranks."""


@dataclass(frozen=True)
class Endpoint:
    """Where the receivers of one sync meet the sender: the sender's store at ``host:port``,
    ``world_size`` ranks (the sender is rank 0), the process-group ``backend`` (gloo or nccl),
    and the seconds any step may wait."""

    host: str
    port: int
    world_size: int
    backend: str
    timeout_s: float
    shm_probe: str | None = None  # "<path> <token>": the sender's shared memory (same-host transport), if offered


@dataclass(frozen=True)
class SyncStats:
    """One sync seen from the sender: ``bytes`` sent once (not once per receiver), ``seconds``
    from the start of ``send`` to the last acknowledgement, of which ``setup_s`` until the group
    formed (every receiver joined), ``tensors`` and ``buckets``."""

    bytes: int
    seconds: float
    tensors: int
    buckets: int
    setup_s: float = 0.0

    @property
    def gb_per_s(self) -> float:
        """Effective rate in GB/s (10**9 bytes): model bytes over the whole sync's seconds."""
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def node_ip() -> str:
    """This node's IP as other nodes reach it: the source address of a route to a public address
    (a UDP connect sends nothing); 127.0.0.1 where the machine has no route out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for tensors on ``device``: nccl for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ``_ALIGN`` bytes."""
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _group(store: dist.Store, rank: int, size: int, backend: str, host: str, timeout_s: float) -> dist.ProcessGroup:
    """A process group of ``size`` ranks on ``store``, outside the default group. Blocks until
    every rank has made its side (gloo connects its full mesh here), at most ``timeout_s``."""
    timeout = timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore("raydpo-pg", store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # The device bound to the store's host: its default looks the hostname up, which fails
        # on machines whose hostname does not resolve.
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(prefixed, rank, size, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, opts)
    raise ValueError(f"weight sync backend {backend!r}: gloo or nccl")


def _broadcast(group: dist.ProcessGroup, buffer: torch.Tensor, timeout_s: float) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    opts.timeout = timedelta(seconds=timeout_s)
    group.broadcast([buffer], opts).wait(timedelta(seconds=timeout_s))
    if buffer.is_cuda:
        torch.cuda.current_stream().synchronize()


def _close_group(group: dist.ProcessGroup | None) -> None:
    if group is None:
        return
    try:
        group.abort()  # gloo: closes its sockets, so peers still inside a collective fail at once
    except Exception:
        try:
            group.shutdown()
        except Exception:
            pass


class WeightSender:
    """Rank 0 of one sync: hosts the store, packs and broadcasts buckets. Use :meth:`open`."""

    def __init__(self, store: dist.TCPStore, endpoint: Endpoint, device: torch.device) -> None:
        self._store, self.endpoint, self.device = store, endpoint, device
        self._group: dist.ProcessGroup | None = None
        self.transport: str | None = None  # "shm", "gloo" or "nccl", chosen when the receivers joined

    @classmethod
    def open(cls, n_receivers: int, device: torch.device | str = "cpu", timeout_s: float = 120.0,
             host: str | None = None, shared_memory: bool = True) -> "WeightSender":
        """Host the store of one sync for ``n_receivers`` receivers on ``host`` (this node's IP by
        default; the kernel picks the port). Returns at once: receivers join during :meth:`send`.
        ``shared_memory`` (CPU only): where every receiver can open this process's shared memory
        (same host, same pid namespace), buckets go through it instead of gloo's broadcast."""
        if n_receivers < 1:
            raise ValueError(f"weight sync needs at least one receiver, got {n_receivers}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        host = host or node_ip()
        store = dist.TCPStore(host, 0, world_size=None, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        backend = backend_for(device)
        probe = _arena().probe if shared_memory and backend == "gloo" and hasattr(os, "memfd_create") else None
        endpoint = Endpoint(host, store.port, n_receivers + 1, backend, float(timeout_s), probe)
        return cls(store, endpoint, device)

    def _await(self, keys: list[str], what: str) -> None:
        """Wait at most ``timeout_s`` for every key in ``keys`` (``<step>/<rank>[/...]``); a
        :class:`WeightSyncError` naming the ranks whose key is missing otherwise."""
        try:
            self._store.wait(keys, timedelta(seconds=self.endpoint.timeout_s))
        except Exception as e:
            missing = [int(k.split("/")[1]) for k in keys if not self._store.check([k])]
            raise WeightSyncError(f"weight sync at {self._where()}: receiver ranks {missing} did not {what} within "
                                  f"{self.endpoint.timeout_s:g} s ({type(e).__name__})") from None

    def _where(self) -> str:
        e = self.endpoint
        return f"{e.host}:{e.port} ({self.transport or e.backend}, {e.world_size - 1} receivers)"

    def _progress(self) -> dict[int, int]:
        """Each receiver's number of buckets received so far (from the store; -1: none known)."""
        out = {}
        for rank in range(1, self.endpoint.world_size):
            key = f"got/{rank}"
            out[rank] = int(self._store.get(key)) if self._store.check([key]) else 0
        return out

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
             bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncStats:
        """Broadcast ``named_tensors`` (any iterable, consumed once, in order) to every receiver
        in buckets of about ``bucket_bytes`` bytes; returns once every receiver acknowledged the
        whole stream. :class:`WeightSyncError` within ``timeout_s`` of the step that fails."""
        ranks = range(1, self.endpoint.world_size)
        t0 = time.perf_counter()
        self._await([f"joined/{r}" for r in ranks], "join")
        local = self.endpoint.shm_probe is not None and all(self._store.get(f"joined/{r}") == b"shm" for r in ranks)
        self.transport = "shm" if local else self.endpoint.backend
        self._store.set("transport", self.transport)
        try:
            self._group = _group(self._store, 0, self.endpoint.world_size, self.endpoint.backend,
                                 self.endpoint.host, self.endpoint.timeout_s)
        except Exception as e:
            raise WeightSyncError(f"weight sync at {self._where()}: the process group did not form within "
                                  f"{self.endpoint.timeout_s:g} s: {e}") from None
        setup_s = time.perf_counter() - t0
        # shm: one sync at a time in this process writes the arena (another thread's waits here).
        with _ARENA_LOCK if self.transport == "shm" else contextlib.nullcontext():
            total = tensors = buckets = 0
            pending: list[tuple[str, torch.Tensor]] = []
            pending_bytes = 0
            try:
                for name, tensor in named_tensors:
                    size = _aligned(tensor.numel() * tensor.element_size())
                    if pending and pending_bytes + size > bucket_bytes:
                        total += self._send_bucket(buckets, pending, pending_bytes)
                        buckets, pending, pending_bytes = buckets + 1, [], 0
                    pending.append((name, tensor))
                    pending_bytes += size
                    tensors += 1
                    if pending_bytes >= bucket_bytes:  # full: out now, not when the next tensor comes
                        total += self._send_bucket(buckets, pending, pending_bytes)
                        buckets, pending, pending_bytes = buckets + 1, [], 0
                if pending:
                    total += self._send_bucket(buckets, pending, pending_bytes)
                    buckets += 1
            except BaseException as e:
                reason = (f"bucket {buckets} failed after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}; "
                          f"buckets received per receiver rank: {self._progress()}")
                self._abort(buckets, reason)
                raise WeightSyncError(f"weight sync at {self._where()}: {reason}") from None
            self._store.set(f"bucket/{buckets}", json.dumps({"end": True, "tensors": tensors}))
            self._await([f"ack/{r}" for r in ranks], "acknowledge the whole stream")
        return SyncStats(total, time.perf_counter() - t0, tensors, buckets, setup_s)

    def _send_bucket(self, index: int, tensors: list[tuple[str, torch.Tensor]], nbytes: int) -> int:
        """Pack ``tensors`` into one flat byte buffer, publish its metadata, broadcast it (shm:
        the buffer is the arena's, which receivers map). Returns the bytes of tensor
        data (without alignment padding)."""
        head: dict = {"bytes": nbytes}
        if self.transport == "shm":
            path, flat = _arena().slot(index, nbytes)
            head["shm"] = path
        else:
            flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        meta, offset, data = [], 0, 0
        with torch.no_grad():
            for name, tensor in tensors:
                n = tensor.numel() * tensor.element_size()
                flat[offset: offset + n].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
                meta.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset])
                offset, data = offset + _aligned(n), data + n
        self._store.set(f"bucket/{index}", json.dumps({**head, "tensors": meta}))
        # shm: the collective carries the bucket's index only, as the go signal; it also finds a
        # receiver that died (its socket closed) at once, as the full broadcast does.
        _broadcast(self._group, torch.tensor([index]) if self.transport == "shm" else flat, self.endpoint.timeout_s)
        return data

    def _abort(self, index: int, reason: str) -> None:
        """Tell receivers waiting for bucket metadata that the sync is over, and break the group
        so receivers inside a broadcast fail now rather than at their timeout."""
        try:
            for i in (index, index + 1):  # bucket ``index`` may or may not have been announced
                self._store.compare_set(f"bucket/{i}", "", json.dumps({"abort": reason}))
        except Exception:
            pass
        _close_group(self._group)
        self._group = None

    def close(self) -> None:
        """Tear the group down and stop hosting the store (the shm arena stays for the next
        sync of this process: :func:`release_shared_memory`)."""
        _close_group(self._group)
        self._group = None
        self._store = None  # the store's server stops with its last reference

    def __enter__(self) -> "WeightSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WeightReceiver:
    """Rank ``rank`` (1 .. world_size - 1) of one sync. Construction joins: it connects to the
    sender's store and blocks until the whole group has formed (at most ``timeout_s``). Tensors
    arrive on the CPU (gloo, shm) or on this process's current CUDA device (nccl) unless
    ``device`` says otherwise; a consumer copies them where they go."""

    def __init__(self, endpoint: Endpoint, rank: int, device: torch.device | str | None = None) -> None:
        if not 1 <= rank < endpoint.world_size:
            raise ValueError(f"receiver rank {rank}: must be in 1..{endpoint.world_size - 1}")
        self.endpoint, self.rank = endpoint, rank
        self.transport: str | None = None
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if endpoint.backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)
        self._group: dist.ProcessGroup | None = None
        timeout = timedelta(seconds=endpoint.timeout_s)
        try:
            self._store = dist.TCPStore(endpoint.host, endpoint.port, is_master=False, timeout=timeout,
                                        wait_for_workers=False)
            self._store.set(f"joined/{rank}", "shm" if _reads_probe(endpoint.shm_probe) else "net")
            self.transport = self._store.get("transport").decode()  # the sender decides once all joined
            self._group = _group(self._store, rank, endpoint.world_size, endpoint.backend, endpoint.host,
                                 endpoint.timeout_s)
        except Exception as e:
            raise WeightSyncError(f"{self._what()}: could not join within {endpoint.timeout_s:g} s: "
                                  f"{type(e).__name__}: {e}") from None

    def _what(self) -> str:
        e = self.endpoint
        return f"weight sync from {e.host}:{e.port} (receiver rank {self.rank} of {e.world_size - 1})"

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The sender's tensors in its order, as views into the bucket they came in (a new
        bucket each time: a consumer may keep what it was given). Acknowledges the end of the
        stream to the sender; :class:`WeightSyncError` if the sender aborts, dies or stalls."""
        t0, index = time.perf_counter(), 0
        while True:
            try:
                meta = json.loads(self._store.get(f"bucket/{index}"))
            except Exception as e:
                raise WeightSyncError(f"{self._what()}: no metadata for bucket {index} after "
                                      f"{time.perf_counter() - t0:.1f} s (timeout {self.endpoint.timeout_s:g} s; "
                                      f"the sender stalled or died): {type(e).__name__}: {e}") from None
            if "abort" in meta:
                raise WeightSyncError(f"{self._what()}: the sender aborted: {meta['abort']}")
            if meta.get("end"):
                self._store.set(f"ack/{self.rank}", "1")
                return
            try:
                if "shm" in meta:  # a private mapping: reading copies nothing, and no write reaches the sender
                    _broadcast(self._group, torch.tensor([-1]), self.endpoint.timeout_s)
                    flat = torch.from_file(meta["shm"], shared=False, size=meta["bytes"], dtype=torch.uint8)
                else:
                    flat = torch.empty(meta["bytes"], dtype=torch.uint8, device=self.device)
                    _broadcast(self._group, flat, self.endpoint.timeout_s)
            except Exception as e:
                raise WeightSyncError(f"{self._what()}: bucket {index} failed after {time.perf_counter() - t0:.1f} s: "
                                      f"{type(e).__name__}: {e}") from None
            for name, dtype, shape, offset in meta["tensors"]:
                dt = getattr(torch, dtype)
                n = dt.itemsize * _numel(shape)
                yield name, flat[offset: offset + n].view(dt).view(shape)
            self._store.set(f"got/{self.rank}", str(index + 1))  # taken by the consumer: it asked for the next
            index += 1

    def close(self) -> None:
        _close_group(self._group)
        self._group = None
        self._store = None

    def __enter__(self) -> "WeightReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ShmArena:
    """The sender process's bucket buffers in shared memory, one per bucket index, kept across
    syncs: ``memfd_create`` files, which receivers on this host open as ``/proc/<pid>/fd/<fd>``.

    Why kept: writing into fresh tmpfs pages runs at ~1.3 GB/s on the 2-core test machine (a page
    fault per 4 KiB), into pages written before at ~8 GB/s; a trainer syncs the same buckets every
    round. Why memfd and not files in /dev/shm: a memfd has no name to leak. The kernel frees it
    when the sender's process ends, however it ends (Ray ends its workers without running atexit)
    and the receivers have unmapped it. The cost: one copy of the model in shared memory while the
    sender's process lives (:func:`release_shared_memory` frees it sooner). A receiver's view into a
    buffer is valid until the sender's next sync rewrites it: receivers copy (both generators do)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        probe_fd = os.memfd_create("raydpo-weights-probe")
        token = secrets.token_hex(8)
        os.write(probe_fd, token.encode())
        self.fds = [probe_fd]
        # A receiver that reads the token through /proc shares this host and may open our buffers.
        self.probe = f"/proc/{self.pid}/fd/{probe_fd} {token}"
        self.slots: dict[int, tuple[int, torch.Tensor]] = {}

    def slot(self, index: int, nbytes: int) -> tuple[str, torch.Tensor]:
        """The path of bucket ``index``'s buffer and a shared mapping of its first ``nbytes`` bytes."""
        fd, mapped = self.slots.get(index, (-1, torch.empty(0, dtype=torch.uint8)))
        if mapped.numel() < nbytes:
            if fd >= 0:
                os.close(fd)  # receivers' mappings of it stay valid; a new buffer, never a truncated one
            fd = os.memfd_create(f"raydpo-weights-{index}")
            os.ftruncate(fd, nbytes)
            mapped = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)
            self.slots[index] = (fd, mapped)
        return f"/proc/{self.pid}/fd/{fd}", mapped[:nbytes]

    def release(self) -> None:
        for fd in self.fds + [fd for fd, _ in self.slots.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds, self.slots = [], {}


_ARENA: list[_ShmArena] = []  # this process's arena, made by the first shm sync
_ARENA_LOCK = threading.Lock()


def _arena() -> _ShmArena:
    if not _ARENA or _ARENA[0].pid != os.getpid():  # a forked child makes its own
        _ARENA[:] = [_ShmArena()]
    return _ARENA[0]


def release_shared_memory() -> None:
    """Free this process's shared-memory buffers now (else when it ends); the next shm sync makes new ones."""
    if _ARENA:
        _ARENA.pop().release()


def _reads_probe(probe: str | None) -> bool:
    """Whether this process can open the sender's shared memory (reads its probe's token)."""
    if not probe:
        return False
    path, token = probe.split(" ")
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
