"""Whether a checkpoint is whole: its manifest, written last, and the driver's check before a resume.

A training checkpoint is one folder that Ray Train copies from every rank's staging folder into its
run folder (``{storage_path}/{name}/checkpoint_<time>``) and then records in its snapshot
(``checkpoint_manager_snapshot.json``), which a re-run or a restart resumes from. The folder holds
the engine's files (DDP: ``engine_state.pt``; DeepSpeed: ``latest``, ``zero_to_fp32.py`` and
``global_step<N>/`` with the model states and one optimizer partition per rank), ``loop_state.json``
and one ``rng_rank<r>.pt`` per rank.

**The manifest** (:data:`MANIFEST`) is written into the staging folder after every rank's files are
in place, so it is the last file of a checkpoint; it names every file (path relative to the
checkpoint, ``/``-separated) with its size in bytes and its SHA-256::

    {"format": 1, "step": 16, "files": {"engine_state.pt": {"size": 1234, "sha256": "9f..."}, ...}}

A checkpoint is intact only when every listed file is there with that size and that hash (a size
alone misses a flipped bit, which ``torch.load`` loads without a word). A file it does not list is
ignored: no loader reads one (DDP reads ``engine_state.pt``; DeepSpeed the tag that ``latest`` names
and the partition names it computes from the world size; the loop ``loop_state.json`` and its own
``rng_rank<r>.pt``). SHA-256 from :mod:`hashlib` (OpenSSL) hashed 1.0 s/GB on one core of the
project's loaded 2-core machine (blake2b 1.9 s/GB, MD5 2.0 s/GB); the ranks hash a share of the files
each at save time, and the driver hashes with a thread per file (hashlib releases the GIL).

**A checkpoint without a manifest**: one written by raydpo before manifests is trusted, with a
warning (refusing it would leave an upgraded run nothing to resume from); a load of it that fails on
its bytes is still caught as damage (:func:`is_read_failure`). A checkpoint whose ``loop_state.json``
says it has a manifest (``"manifest"`` key, written since) but has none is damaged.

**Before a resume** (:func:`repair_run`, on the driver before Ray Train starts): the newest
registered checkpoint is verified; a damaged one is moved to ``{run}/damaged/`` with a note of why,
and the next older one is tried; Ray Train's snapshot is rewritten without the checkpoints moved or
gone (its own format, through its own model), or rebuilt from the intact folders where it is itself
damaged or missing. Where checkpoints existed and none is intact, :class:`NothingToResume` (a user's
error: exit 2), and nothing starts over by itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydpo.errors import InputError

MANIFEST = "raydpo_manifest.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train 2.60's name (CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
DAMAGED = "damaged"  # {run}/damaged/: checkpoints (and a snapshot) moved aside, each with a .txt saying why
FORMAT = 1
_CHUNK = 8 * 2**20  # bytes read at a time while hashing


class DamagedCheckpoint(InputError):
    """A checkpoint that cannot be loaded: ``folder`` and ``why`` (the file, expected vs found).
    Raised by a training worker whose load failed on the checkpoint's bytes; the driver moves the
    checkpoint aside and resumes from the one before (:func:`repair_run`)."""

    def __init__(self, folder: str, why: str) -> None:
        super().__init__(folder, why)  # both in args: Ray pickles an exception by its args
        self.folder, self.why = folder, why

    def __str__(self) -> str:
        return f"checkpoint {self.folder} is damaged: {self.why}"


class NothingToResume(InputError):
    """The run folder held checkpoints, and none is intact."""


# --- the manifest ---------------------------------------------------------------------------------

def sha256_of(read: Callable[[int], bytes]) -> str:
    """SHA-256 of what ``read(n)`` yields until it returns nothing."""
    h = hashlib.sha256()
    while chunk := read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def local_files(folder: Path) -> list[str]:
    """Every file under ``folder``, relative and ``/``-separated, sorted; the manifest left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def describe(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> ``{"size", "sha256"}`` of these files of a local ``folder``, one thread per file."""
    def one(name: str) -> dict[str, Any]:
        with open(folder / name, "rb") as f:
            return {"size": os.fstat(f.fileno()).st_size, "sha256": sha256_of(f.read)}

    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        return dict(zip(names, pool.map(one, names)))


def write_manifest(folder: Path, step: int, files: dict[str, dict[str, Any]]) -> None:
    """The manifest of a local checkpoint folder, written atomically (a temporary file renamed), so
    a half-written manifest never exists under its name."""
    tmp = folder / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


# --- verifying, on any pyarrow filesystem (a local folder, s3://, gs://) ------------------------------

@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found: ``damage`` (why, or None where intact); ``unverified``: it has no
    manifest and was written before manifests (trusted, with a warning)."""

    damage: str | None
    unverified: bool = False


def _read_json(fs, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.readall().decode("utf-8"))


def _why_unreadable(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


# folder -> the (name, size, mtime) of its files when this process found it intact: the job's check
# before any work and train_policy's then hash it once (a file changed since has another size or mtime).
_INTACT: dict[str, tuple] = {}


def verify(fs, folder: str) -> Verdict:
    """Check checkpoint ``folder`` (a path on pyarrow filesystem ``fs``) against its manifest. A name
    in the manifest outside the folder (``../x``) is not among its files, so it is "missing": nothing
    outside the folder is read."""
    import pyarrow.fs

    infos = {i.path[len(folder) + 1:]: i for i in fs.get_file_info(
        pyarrow.fs.FileSelector(folder, recursive=True, allow_not_found=True)) if i.type == pyarrow.fs.FileType.File}
    listing = tuple(sorted((name, i.size, i.mtime_ns) for name, i in infos.items()))
    if _INTACT.get(folder) == listing:
        return Verdict(None)
    verdict = _verify(fs, folder, infos)
    if verdict.damage is None and not verdict.unverified:
        _INTACT[folder] = listing
    return verdict


def _verify(fs, folder: str, infos: dict) -> Verdict:
    """:func:`verify` without the memo; ``infos``: the folder's files by relative name."""
    if MANIFEST not in infos:
        if "loop_state.json" not in infos:
            return Verdict(f"it has neither {MANIFEST} nor loop_state.json")
        try:
            state = _read_json(fs, f"{folder}/loop_state.json")
        except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
            return Verdict(f"it has no {MANIFEST} and its loop_state.json is unreadable ({_why_unreadable(e)})")
        if not isinstance(state, dict) or "manifest" in state:
            return Verdict(f"its manifest {MANIFEST} is missing")
        return Verdict(None, unverified=True)  # an older raydpo's
    try:
        manifest = _read_json(fs, f"{folder}/{MANIFEST}")
        files = manifest["files"]
        listed = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return Verdict(f"its manifest {MANIFEST} is unreadable ({_why_unreadable(e)})")
    problems = []
    for name, (size, _) in listed.items():
        if name not in infos:
            problems.append(f"{name} is missing")
        elif infos[name].size != size:
            problems.append(f"{name} is {infos[name].size} bytes, its manifest says {size}")
    if problems:
        return Verdict("; ".join(problems))

    def digest(name: str) -> str:
        with fs.open_input_stream(f"{folder}/{name}") as f:
            return sha256_of(f.read)

    names = sorted(listed)
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        found = dict(zip(names, pool.map(digest, names)))
    changed = [f"{name}'s content is not what was written (SHA-256 {found[name][:12]}..., its manifest says "
               f"{listed[name][1][:12]}...)" for name in names if found[name] != listed[name][1]]
    return Verdict("; ".join(changed) or None)


def is_read_failure(error: BaseException) -> bool:
    """Whether a checkpoint load failed on the checkpoint's bytes (a file missing, empty, cut short or
    changed) rather than on, say, the device or the model: what torch, pickle and json raise then.
    Bytes that still parse (a flipped bit inside a tensor) load without an error: only the
    manifest's hash finds them."""
    if isinstance(error, (FileNotFoundError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                          UnicodeDecodeError, json.JSONDecodeError, ModuleNotFoundError)):
        return True  # ModuleNotFoundError: a pickle whose class name was changed
    return isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error)  # torch's zip reader


# --- the driver's check before a resume -------------------------------------------------------------

def _move_aside(fs, run: str, name: str, why: str) -> str:
    """Move ``{run}/{name}`` to ``{run}/damaged/{name}`` (a suffix if taken), with ``{name}.txt`` saying
    why; returns where it went. A filesystem that cannot rename a folder (object stores) copies it."""
    import pyarrow.fs

    fs.create_dir(f"{run}/{DAMAGED}")
    target = f"{run}/{DAMAGED}/{name}"
    if fs.get_file_info(target).type != pyarrow.fs.FileType.NotFound:
        target += f".{time.strftime('%Y%m%d-%H%M%S')}"
    source = f"{run}/{name}"
    try:
        fs.move(source, target)
    except (OSError, NotImplementedError):
        folder = fs.get_file_info(source).type == pyarrow.fs.FileType.Directory
        pyarrow.fs.copy_files(source, target, source_filesystem=fs, destination_filesystem=fs)
        (fs.delete_dir if folder else fs.delete_file)(source)
    with fs.open_output_stream(f"{target}.txt") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {why}\n".encode())
    return target


def _write_snapshot(fs, run: str, state) -> None:
    """Ray Train's snapshot, from its own model: to a temporary name, then renamed over the old one
    where the filesystem can (a snapshot cut short by a crash here would be damaged itself)."""
    path, tmp = f"{run}/{SNAPSHOT}", f"{run}/.{SNAPSHOT}.tmp{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(state.model_dump_json().encode("utf-8"))
    fs.move(tmp, path)


def _step(fs, run: str, name: str) -> str:
    """The step of a checkpoint, for messages ("?" where unreadable)."""
    try:
        return str(int(_read_json(fs, f"{run}/{name}/loop_state.json")["step"]))
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def _read_snapshot(fs, run: str):
    """Ray Train's snapshot as its model, or (None, why it is unusable), or (None, None) where absent."""
    import pyarrow.fs
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    path = f"{run}/{SNAPSHOT}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None, None
    try:
        return _CheckpointManagerState.model_validate(_read_json(fs, path)), None
    except Exception as e:  # noqa: BLE001 - JSON, UTF-8 or pydantic's validation: all mean unusable
        return None, _why_unreadable(e)


def _rebuilt(names: list[str], fs, run: str):
    """A snapshot of Ray Train's model listing ``names`` (oldest first) as its reported checkpoints,
    in that order, the last the latest; the metrics are the step alone (ours report more, lost with
    the damaged snapshot)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (_CheckpointManagerState,
                                                                                _TrainingResultState)

    steps = {n: _step(fs, run, n) for n in names}
    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={} if steps[n] == "?" else {"step": int(steps[n])})
               for n in names]
    return _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=results[-1] if results else None, pending_training_results=[],
        pending_validation_specs=[], current_report_index=len(results), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])


def _without(state, gone: set[str]):
    """``state`` less the checkpoints named in ``gone``; the latest is the newest one left (by the
    order Ray Train reported them)."""
    kept = [(r, i) for r, i in zip(state.checkpoint_results, state.checkpoint_report_indices)
            if r.checkpoint_dir_name not in gone]
    pending = [(r, v) for r, v in zip(state.pending_training_results, state.pending_validation_specs)
               if r.checkpoint_dir_name not in gone]
    newest = max(kept, key=lambda ri: ri[1])[0] if kept else None
    return state.model_copy(update={
        "checkpoint_results": [r for r, _ in kept], "checkpoint_report_indices": [i for _, i in kept],
        "latest_checkpoint_result": newest,
        "pending_training_results": [r for r, _ in pending], "pending_validation_specs": [v for _, v in pending],
        "validated_checkpoint_dir_names": [n for n in state.validated_checkpoint_dir_names if n not in gone],
        "timed_out_validation_checkpoint_dir_names": [
            n for n in state.timed_out_validation_checkpoint_dir_names if n not in gone],
        "failed_validation_checkpoint_dir_names": [n for n in state.failed_validation_checkpoint_dir_names
                                                   if n not in gone]})


def repair_run(storage_path: str, name: str, say: Callable[[str], None],
               known_damage: dict[str, str] | None = None) -> str | None:
    """Before Ray Train starts on run folder ``{storage_path}/{name}``: make its snapshot name only
    intact checkpoints, its latest the newest intact one. Returns that checkpoint's folder name, or
    None where the run has never checkpointed (a fresh start).

    Newest first, each registered checkpoint is verified (:func:`verify`) until one is intact; a
    damaged one (and any in ``known_damage``, folder name -> why: a worker's failed load) is moved
    to ``{run}/damaged/`` and one line says which and why; one that is gone is dropped. A snapshot
    that is unreadable is moved aside too and rebuilt from the checkpoint folders; a missing one,
    where folders exist, is rebuilt. Raises :class:`NothingToResume` where checkpoints existed (or
    were moved aside before) and none is intact."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    run = f"{root.rstrip('/')}/{name}"
    where = f"{storage_path.rstrip('/')}/{name}"
    entries = fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True))
    folders = sorted(e.base_name for e in entries
                     if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("checkpoint_"))
    state, unusable = _read_snapshot(fs, run)
    if unusable:
        moved = _move_aside(fs, run, SNAPSHOT, f"unreadable: {unusable}")
        say(f"[raydpo] Ray Train's snapshot {where}/{SNAPSHOT} is damaged ({unusable}): moved to {moved}; "
            "rebuilt from the checkpoint folders")
    registered = [r.checkpoint_dir_name for r in state.checkpoint_results] if state else folders
    order = ({r.checkpoint_dir_name: i for r, i in zip(state.checkpoint_results, state.checkpoint_report_indices)}
             if state else {n: i for i, n in enumerate(folders)})
    gone: dict[str, str] = {}  # folder name -> why it is no longer a checkpoint
    chosen = None
    for candidate in sorted(registered, key=order.__getitem__, reverse=True):
        if candidate not in folders:
            gone[candidate] = "its folder is gone"
            say(f"[raydpo] checkpoint {where}/{candidate}, in Ray Train's snapshot, is gone: skipped")
            continue
        if chosen is not None:
            continue  # older than the one resumed from: checked when it is the newest
        verdict = (Verdict(known_damage[candidate]) if known_damage and candidate in known_damage
                   else verify(fs, f"{run}/{candidate}"))
        if verdict.damage is None:
            chosen = candidate
            if verdict.unverified:
                say(f"[raydpo] checkpoint {where}/{candidate} (step {_step(fs, run, candidate)}) has no manifest "
                    f"({MANIFEST}, written since raydpo checks checkpoints): resuming from it unverified")
            continue
        step = _step(fs, run, candidate)
        moved = _move_aside(fs, run, candidate, verdict.damage)
        gone[candidate] = verdict.damage
        say(f"[raydpo] checkpoint {where}/{candidate} (step {step}) is damaged: {verdict.damage}; moved to {moved}")
    if state is None and (folders or unusable):
        state = _rebuilt([n for n in folders if n not in gone], fs, run)
        _write_snapshot(fs, run, state)
    elif state is not None and gone:
        _write_snapshot(fs, run, _without(state, set(gone)))
    if chosen is not None:
        if gone:
            say(f"[raydpo] resuming from {where}/{chosen} (step {_step(fs, run, chosen)}), the newest intact checkpoint")
        return chosen
    set_aside = fs.get_file_info(pyarrow.fs.FileSelector(f"{run}/{DAMAGED}", allow_not_found=True))
    if gone or any(e.base_name.startswith("checkpoint_") and e.type == pyarrow.fs.FileType.Directory
                   for e in set_aside):
        raise NothingToResume(
            f"no intact checkpoint to resume from in {where}: every checkpoint is damaged or gone (moved to "
            f"{where}/{DAMAGED}, each with a .txt saying why). To start over, delete {where} (or use a new "
            "output_dir); nothing was started, so nothing was overwritten")
    return None
