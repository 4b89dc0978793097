"""A durable, file-backed queue of training jobs (what ``POST /train`` records).

Layout of the queue folder, one pair of files per job::

    <job_id>.jsonl          one sample per line: {"context_ids": [...], "continuation_ids": [...]}
    <job_id>.status.json    {"job_id", "status", "samples", "created", "created_ns", "updated"}

Both are written atomically (:mod:`scoring_kit._files`), the samples first: a job exists once
its status file exists, so a crash between the two writes leaves only an orphan ``.jsonl``
that :meth:`TrainQueue.jobs` ignores. Status changes go through
:func:`~scoring_kit._files.locked_update_json`, so a trainer in another process can claim
jobs safely. No weights are updated yet: every job stays ``"queued"`` until such a trainer
exists.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import orjson

from .. import _settings
from .._exceptions import ConfigError, StoreError
from .._files import (
    atomic_write_bytes,
    atomic_write_json,
    locked_update_json,
    read_json,
    read_jsonl,
)
from .._settings import TRAIN_DIR_ENV
from .._types import PathLike

__all__ = [
    "JOB_STATUSES",
    "TRAIN_DIR_ENV",
    "JobInfo",
    "JobStatus",
    "TrainQueue",
    "default_train_dir",
]


JobStatus = Literal["queued", "running", "done", "failed"]
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "done", "failed")

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_STATUS_SUFFIX = ".status.json"


def default_train_dir() -> Path:
    """The job folder used when none is given.

    ``$SCORING_KIT_TRAIN_DIR`` if set, else ``$XDG_DATA_HOME/scoring_kit/train`` (by default
    ``~/.local/share/scoring_kit/train``): a persistent place, because a client marks samples
    as trained once their job is recorded.
    """
    return _settings.train_dir()


class JobInfo(TypedDict):
    """What :meth:`TrainQueue.status` returns (and ``GET /train/status`` sends)."""

    job_id: str
    status: str
    samples: int
    #: submission time, Unix seconds (int)
    created: int
    #: submission time, Unix nanoseconds
    created_ns: int
    #: last status change, Unix nanoseconds
    updated_ns: int


class TrainQueue:
    """Training jobs recorded as files in ``directory`` (created if missing).

    Parameters
    ----------
    directory
        The queue folder. Several processes may share it.

    Examples
    --------
    >>> import tempfile
    >>> q = TrainQueue(tempfile.mkdtemp())
    >>> job = q.submit([{"context_ids": [1, 2], "continuation_ids": [3]}])
    >>> q.status(job)["status"], q.status(job)["samples"]
    ('queued', 1)
    """

    def __init__(self, directory: PathLike) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"could not create the training queue folder {self.directory}: {exc}"
            raise StoreError(msg) from exc

    def __repr__(self) -> str:
        return f"TrainQueue({str(self.directory)!r})"

    @staticmethod
    def valid_job_id(job_id: str) -> bool:
        """Whether ``job_id`` has the form this queue generates (32 lowercase hex digits)."""
        return bool(_JOB_ID.match(job_id))

    def samples_path(self, job_id: str) -> Path:
        """The ``.jsonl`` file holding the samples of ``job_id``."""
        return self.directory / f"{self._checked(job_id)}.jsonl"

    def status_path(self, job_id: str) -> Path:
        """The status file of ``job_id``."""
        return self.directory / f"{self._checked(job_id)}{_STATUS_SUFFIX}"

    def _checked(self, job_id: str) -> str:
        if not self.valid_job_id(job_id):
            msg = f"job id {job_id!r} is not a training job id (expected 32 hex digits)"
            raise KeyError(msg)
        return job_id

    def submit(self, samples: Sequence[Mapping[str, Any]]) -> str:
        """Record a job durably and return its id.

        Parameters
        ----------
        samples
            JSON-serialisable samples (the server validates them first); one line each.

        Returns
        -------
        str
            The new job id (32 hex digits).
        """
        job_id = uuid.uuid4().hex
        body = b"".join(orjson.dumps(dict(s)) + b"\n" for s in samples)
        atomic_write_bytes(self.samples_path(job_id), body)
        now = time.time_ns()
        info: JobInfo = {
            "job_id": job_id,
            "status": "queued",
            "samples": len(samples),
            "created": now // 1_000_000_000,
            "created_ns": now,
            "updated_ns": now,
        }
        atomic_write_json(self.status_path(job_id), info)
        return job_id

    def status(self, job_id: str) -> JobInfo:
        """The status record of ``job_id``.

        Raises
        ------
        KeyError
            No such job in this queue (also for ids of the wrong form).
        StoreError
            The status file is corrupt.
        """
        path = self.status_path(job_id)
        info = read_json(path, None)
        if info is None:
            msg = f"no training job {job_id!r} in {self.directory}"
            raise KeyError(msg)
        return self._checked_info(info, path)

    @staticmethod
    def _checked_info(info: Any, path: Path) -> JobInfo:
        keys = ("job_id", "status", "samples", "created")
        if not isinstance(info, dict) or any(k not in info for k in keys):
            msg = f"{path} is not a training job status record (needs keys {', '.join(keys)})"
            raise StoreError(msg)
        return info  # type: ignore[return-value]

    def samples(self, job_id: str) -> list[Any]:
        """The samples of ``job_id``, in submission order."""
        self.status(job_id)
        return read_jsonl(self.samples_path(job_id))

    def set_status(self, job_id: str, status: JobStatus) -> JobInfo:
        """Change the status of ``job_id`` (under the file lock) and return the new record."""
        if status not in JOB_STATUSES:
            msg = f"unknown job status {status!r}; expected one of {', '.join(JOB_STATUSES)}"
            raise ConfigError(msg)
        self.status(job_id)
        path = self.status_path(job_id)

        def change(info: Any) -> Any:
            info = self._checked_info(info, path)
            info["status"] = status
            info["updated_ns"] = time.time_ns()
            return info

        new: JobInfo = locked_update_json(path, change, None)
        return new

    def jobs(self) -> list[JobInfo]:
        """Every committed job (one with a status file), oldest first."""
        out: list[JobInfo] = []
        for path in self.directory.glob(f"*{_STATUS_SUFFIX}"):
            job_id = path.name[: -len(_STATUS_SUFFIX)]
            if not self.valid_job_id(job_id):
                continue
            info = read_json(path, None)
            if info is None:  # removed between glob and read
                continue
            out.append(self._checked_info(info, path))
        out.sort(key=lambda j: (j.get("created_ns", 0), j["job_id"]))
        return out
