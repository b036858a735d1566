"""Checkpoints that survive crashes: atomic writes, weights-only loading, resume, one writer per stage."""

from __future__ import annotations

import fcntl
import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from pipeline.errors import UserError

LAST = "last.pt"
LOCK = ".lock"
M = TypeVar("M", bound=nn.Module)


class CheckpointError(UserError):
    """A checkpoint that cannot be used (corrupt file, other params)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a corrupt file is a clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None


def save_model(path: str | Path, model: nn.Module, kwargs: dict[str, Any], meta: dict[str, Any]) -> None:
    """A model file: ``{"kwargs", "state_dict", "meta"}`` with CPU tensors, written atomically, loadable with
    ``weights_only=True`` on any device (a model trained on CUDA loads on a CPU box)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save({"kwargs": dict(kwargs), "state_dict": state, "meta": dict(meta)}, path)


def load_model(path: str | Path, cls: type[M], what: str) -> tuple[M, dict[str, Any]]:
    """``cls(**kwargs)`` with the file's weights, on CPU, and its meta; one clear error naming the file when it is
    not a ``what`` model file."""
    payload = load(path, map_location="cpu")
    try:
        model = cls(**payload["kwargs"])
        model.load_state_dict(payload["state_dict"])
        meta = dict(payload["meta"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a {what} file ({type(exc).__name__}: {exc})") from None
    return model, meta


def resume_state(
    directory: Path, params_hash: str, on_params_change: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any] | None:
    """The last checkpoint in ``directory`` if it belongs to these params.

    A checkpoint from other params is an error, or ignored (fresh start) when
    ``on_params_change == "restart"``.
    """
    path = Path(directory) / LAST
    if not path.is_file():
        return None
    ckpt = load(path, map_location)
    if ckpt.get("params_hash") != params_hash:
        if on_params_change == "restart":
            return None
        raise CheckpointError(
            f"{path}: checkpoint was made with other params; delete it or set train.on_params_change: restart"
        )
    return ckpt


class StageLockedError(UserError):
    """Another run holds the stage's checkpoint directory."""


class StageLock:
    """An exclusive ``flock`` on ``<directory>/.lock``, which records the holder (host, pid, start) as JSON.

    The kernel releases a ``flock`` when its holder dies, so a lock left by a killed run is simply taken
    over; the JSON only names the holder in the refusal. Held until the process exits (its descriptor
    is not inherited by programs the process starts, PEP 446).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK

    def acquire(self) -> None:
        """Take the lock at once or raise :class:`StageLockedError` naming its holder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = self._refusal(fd)
            os.close(fd)
            raise refusal from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)  # fd stays open: the lock is held until exit

    def check_free(self) -> None:
        """Raise :class:`StageLockedError` if another process holds the lock; takes nothing, writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(fd) from None
        finally:
            os.close(fd)

    def _refusal(self, fd: int) -> StageLockedError:
        try:
            record = json.loads(os.pread(fd, 4096, 0))
            holder = f"pid {record['pid']} on host {record['host']} (started {record['started']})"
        except (ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing its record
            holder = "another process"
        return StageLockedError(
            f"{self.directory}: locked by {holder}; another run of this stage is writing there: "
            "wait for it to finish or stop it"
        )


_HELD: dict[Path, StageLock] = {}


def hold_stage_lock(directory: str | Path) -> None:
    """Take ``directory``'s :class:`StageLock` for the rest of this process (the kernel drops it at exit).

    Taken once per process and directory: a process that runs the stage again (a test, a finished run asked
    again) is still the one writer.
    """
    key = Path(directory).resolve()
    if key not in _HELD:
        lock = StageLock(directory)
        lock.acquire()
        _HELD[key] = lock
