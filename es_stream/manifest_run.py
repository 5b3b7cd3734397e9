"""Which run owns a manifest directory: ``_run.json`` beside the epochs records the run's id (a
digest of its pruner's settings) and those settings, so that a different run or policy writing
into the same directory is refused, naming it, unless asked to replace it (``overwrite=True``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

from ._version import __version__
from .atomic import atomic_write
from .errors import ManifestError, naming
from .manifest import LOCK, WRITE_ID, clear_success, epoch_writer

RUN = "_run.json"
_RUN_FORMAT = "es-stream manifest run"
# the names es-stream writes in an epoch directory: what overwrite= may delete, nothing else
_OURS = re.compile(r"shard=\d{5}\.parquet|_SUCCESS|\.writer\.lock|\..+\.tmp")


def run_record(settings: dict[str, str]) -> dict:
    """The record of a run that writes manifests: ``settings`` (``Pruner.state_dict()``: corpus,
    policy and its parameters, schedule, decay) and ``run_id``, a digest of them. A resumed run
    has the same settings, so the same id; another policy, ratio, seed, schedule or corpus has
    another."""
    settings = {str(k): str(v) for k, v in settings.items()}
    digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8)
    return {"format": _RUN_FORMAT, "run_id": digest.hexdigest(), "settings": settings,
            "es_stream_version": __version__}


def read_run(out_dir: str | os.PathLike) -> dict | None:
    """The run record of a manifest directory (see :func:`run_record`); None when there is none
    (a new directory, or manifests of an es-stream version that wrote none)."""
    path = os.path.join(os.fspath(out_dir), RUN)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ManifestError(f"{path}: not an es-stream run record ({exc}); it is the JSON a "
                            "Pruner writes beside the epoch directories — delete it only if "
                            "no run's manifests are in this directory") from exc
    if not (isinstance(data, dict) and data.get("format") == _RUN_FORMAT
            and isinstance(data.get("run_id"), str) and isinstance(data.get("settings"), dict)):
        raise ManifestError(f"{path}: not an es-stream run record (format, run_id and settings "
                            "expected)")
    return data


def run_id(out_dir: str | os.PathLike) -> str | None:
    """The id of the run whose manifests ``out_dir`` holds (None: no record)."""
    record = read_run(out_dir)
    return None if record is None else record["run_id"]


def _epoch_names(out_dir: str) -> list[str]:
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith("epoch=")
                  and os.path.isdir(os.path.join(out_dir, n)))


def _unrecorded_settings(out_dir: str) -> dict[str, str] | None:
    """For manifests without a run record: the settings their first shard file's metadata
    records (corpus and policy parameters); None when there is no epoch to read."""
    for name in _epoch_names(out_dir):
        path = os.path.join(out_dir, name, "shard=00000.parquet")
        try:
            meta = pq.read_schema(path).metadata or {}
        except (FileNotFoundError, pa.ArrowException, OSError):
            continue
        skip = {"epoch", "shard", WRITE_ID, "es_stream_version", "run_id"}
        return {k.decode(): v.decode() for k, v in meta.items() if k.decode() not in skip}
    return None


def _differences(there: dict[str, str], here: dict[str, str], keys=None) -> list[str]:
    keys = sorted(set(there) | set(here)) if keys is None else sorted(keys)
    return [f"{k}={there.get(k)!r} there, {here.get(k)!r} here" for k in keys
            if there.get(k) != here.get(k)]


def check_run(out_dir: str | os.PathLike, record: dict, overwrite: bool = False) -> bool:
    """Whether ``out_dir`` holds manifests of another run than ``record``'s (see
    :func:`run_record`); raises :class:`ManifestError` naming the directory and each setting
    that differs unless ``overwrite``. Manifests without a record are compared by the settings
    their files' metadata records (corpus, policy and its parameters)."""
    out_dir = os.fspath(out_dir)
    there = read_run(out_dir)
    if there is not None:
        if there["run_id"] == record["run_id"]:
            return False
        diffs = _differences(there["settings"], record["settings"])
        who = f"run {there['run_id']}"
    else:
        settings = _unrecorded_settings(out_dir)
        if settings is None:
            return False
        # the files record fewer settings than a run record: compare those they have
        diffs = _differences(settings, record["settings"],
                             keys=set(settings) | (set(record["settings"]) - _NOT_IN_FILES))
        if not diffs:
            return False
        who = "a run of an earlier es-stream (no run record)"
    if not overwrite:
        raise ManifestError(
            f"{out_dir}: holds the manifests of another run ({who}; "
            f"{'; '.join(diffs) or 'other settings'}); a run writing here would mix its "
            "epochs with those: give this run its own manifest directory, or pass "
            "overwrite=True (es-stream prune --overwrite) to delete that run's epochs and "
            "write this one's")
    return True


# settings a run record has and shard files never recorded (the rest, the policy's, they do)
_NOT_IN_FILES = {"decay", "anneal", "burn_in_epochs"}


def claim_run(out_dir: str | os.PathLike, record: dict, overwrite: bool = False) -> None:
    """Make ``out_dir`` the manifest directory of ``record``'s run before it writes an epoch:
    refused as :func:`check_run` says; with ``overwrite``, another run's epoch directories are
    deleted first (only when they hold nothing but what es-stream writes: anything else is
    refused, naming it, and nothing is deleted) and the record replaced."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    other = check_run(out_dir, record, overwrite)
    path = os.path.join(out_dir, RUN)
    if other:
        _remove_epochs(out_dir)
        with naming(path), atomic_write(path) as tmp:
            _write_json(tmp, record)
        return
    if read_run(out_dir) is not None:
        return
    # first claim: create the record only if no other run made one meanwhile
    with naming(path), atomic_write(path + ".new") as tmp:
        _write_json(tmp, record)
    try:
        os.link(path + ".new", path)
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ".new")
    check_run(out_dir, record, overwrite=False)  # a run that claimed it first wins


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _remove_epochs(out_dir: str) -> None:
    names = _epoch_names(out_dir)
    for name in names:  # everything checked before anything is deleted
        for entry in os.listdir(os.path.join(out_dir, name)):
            if not _OURS.fullmatch(entry):
                raise ManifestError(
                    f"{os.path.join(out_dir, name, entry)}: not a file es-stream writes; "
                    f"overwrite deletes only manifests, so {name} is left as it is — move that "
                    "file away, or give this run its own manifest directory")
    for name in names:
        with epoch_writer(out_dir, int(name.split("=", 1)[1])) as directory:
            clear_success(out_dir, int(name.split("=", 1)[1]))  # readers stop here first
            for entry in os.listdir(directory):
                if entry != LOCK:
                    os.unlink(os.path.join(directory, entry))
        with contextlib.suppress(OSError):  # another writer may have started on it: left
            os.rmdir(directory)
