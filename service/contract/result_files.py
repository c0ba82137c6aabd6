"""Where job files live under ``results_dir`` and how expired ones are removed.

``jobs/{id}/video.mp4`` and ``jobs/{id}/result.json`` are written by the worker under a temporary name
and renamed, so a reader sees a whole file or none; so is ``jobs/{id}/thumbnail.jpg``, which the gateway
makes from the video's first frame the first time it is asked for. ``uploads/{id}.upload`` holds a
caption job's input.

Expiry is recorded with the files: whoever finishes a job (its worker, or the gateway's reaper) writes
``jobs/{id}/expires_at``, a Unix time no earlier than the record's own expiry; an upload gets one before
its first byte (:meth:`ResultFiles.new_upload`). The clean-up deletes a job's
files only once that time has passed and Redis holds no record of the job, so a fresh or foreign Redis
(which knows none of these jobs) never causes a deletion; files without an expiry are kept.

Every path is built from a job id that must be one plain name (letters, digits, ``_``, ``-``), so no id
(``../x``, ``/etc``, ``%2e%2e``) can point outside ``results_dir``; the API accepts only 32 hex digits.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from service.contract.errors import StorageError
from service.contract.store import JobStore

log = logging.getLogger(__name__)

SAFE_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
EXPIRY_FILE = "expires_at"
UPLOAD_NAME = "the uploaded video"
"""What errors call a caption job's upload where the client's own file name is unknown (the upload file's
name is internal: it never appears in an answer)."""


def checked_job_id(job_id: str) -> str:
    """``job_id`` if it is one plain path component; ValueError otherwise (a bug or an attack)."""
    if not SAFE_JOB_ID.fullmatch(job_id):
        raise ValueError(f"refusing job id {job_id!r} as a file name")
    return job_id


class ResultFiles:
    def __init__(self, results_dir: Path) -> None:
        self.jobs_dir = results_dir / "jobs"
        self.uploads_dir = results_dir / "uploads"

    def ensure_dirs(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / checked_job_id(job_id)

    def video(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "video.mp4"

    def video_target(self, job_id: str) -> Path:
        """The video path, with its directory created (the writer renames into it)."""
        try:
            self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not create {self.job_dir(job_id)}: {exc}") from exc
        return self.video(job_id)

    def result_json(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result.json"

    def upload(self, job_id: str) -> Path:
        return self.uploads_dir / f"{checked_job_id(job_id)}.upload"

    def thumbnail(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "thumbnail.jpg"

    def write_json(self, job_id: str, payload: dict[str, Any]) -> Path:
        """Write result.json atomically (temporary file in the same directory, then rename)."""
        text = json.dumps(payload, ensure_ascii=False, indent=2)
        return self._write_atomic(self.result_json(job_id), text.encode("utf-8"))

    def write_thumbnail(self, job_id: str, jpeg: bytes) -> Path:
        return self._write_atomic(self.thumbnail(job_id), jpeg)

    @staticmethod
    def _write_atomic(target: Path, data: bytes) -> Path:
        """Temporary file in the target's directory, then rename: readers see the whole file or none."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(temporary, target)
            finally:
                Path(temporary).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"could not write {target}: {exc}") from exc
        return target

    def new_upload(self, job_id: str, ttl_seconds: float) -> Path:
        """The path for a caption job's input, created empty with an expiry ``ttl_seconds`` away recorded
        before any byte arrives. An upload whose job never came to be (the gateway stopped between the two)
        then has no record and is deleted by the clean-up once that expiry passes; a job that is created
        keeps its upload while its record lives, and its end records a new expiry."""
        path = self.upload(job_id)
        try:
            path.touch()
        except OSError as exc:
            raise StorageError(f"could not store the upload of job {job_id}: {exc}") from exc
        self.record_expiry(job_id, ttl_seconds)
        return path

    def remove_job(self, job_id: str) -> None:
        """Delete every file of a job: its results folder and its upload."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        self.remove_upload(job_id)

    def remove_upload(self, job_id: str) -> None:
        self.upload(job_id).unlink(missing_ok=True)

    def record_expiry(self, job_id: str, ttl_seconds: float) -> None:
        """Record that the job's files expire ``ttl_seconds`` from now; called once its record is terminal,
        so the record (which expires ``ttl_seconds`` after finishing) goes first. A job without files gets
        no record. Never raises: a missing expiry only keeps the files longer."""
        if not self.job_dir(job_id).is_dir() and not self.upload(job_id).exists():
            return
        try:
            self._write_atomic(self.job_dir(job_id) / EXPIRY_FILE, repr(time.time() + ttl_seconds).encode())
        except StorageError as exc:
            log.warning("expiry of job %s not recorded; its files are kept: %s", job_id, exc)

    def expires_at(self, job_id: str) -> float | None:
        """The Unix time the job's files expire, as recorded; None if none is (or it is unreadable)."""
        try:
            return float((self.job_dir(job_id) / EXPIRY_FILE).read_text())
        except (OSError, ValueError):
            return None

    def clean_expired(self, store: JobStore) -> int:
        """Delete the files of jobs whose recorded expiry has passed and whose record Redis no longer
        holds. Returns how many jobs' files went."""
        now = time.time()
        removed = 0
        for path in self._entries(self.jobs_dir):
            if not SAFE_JOB_ID.fullmatch(path.name):
                continue
            expires_at = self.expires_at(path.name)
            if expires_at is None or expires_at > now or store.find(path.name) is not None:
                continue
            self.remove_job(path.name)
            removed += 1
        if removed:
            log.info("removed the files of %d expired jobs", removed)
        return removed

    @staticmethod
    def _entries(directory: Path) -> list[Path]:
        return list(directory.iterdir()) if directory.is_dir() else []
