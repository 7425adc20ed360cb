"""Append-only, hash-chained audit log of a run's significant operations.

``<run_dir>/audit.jsonl`` holds one JSON record per line::

    {"seq": 7, "time": 1732480000.1, "rank": 0, "step": 120, "kind": "checkpoint",
     "payload": {...}, "prev_hash": "<hash of record 6>", "hash": "<sha256 of the rest>"}

``hash`` is the sha256 of the canonical JSON (sorted keys, no spaces) of the record without
``hash``; ``prev_hash`` of the first record is 64 zeros. Editing, removing or reordering a
line breaks the chain at that line. Truncating the tail leaves a valid chain, so every append
also rewrites ``audit.head.json`` (seq and hash of the last record, HMAC-signed when the log
has a key): :func:`verify_audit_log` compares the log with it.

In a run, rank 0's recorder appends on its writer thread in the order the trainer asked
(:class:`AuditSink`), flushed at every checkpoint: a crash loses the records still queued, at
most those since the last checkpoint.

Only rank 0 writes (style rule 7); every record still carries ``rank`` and ``step`` so a
record about another rank names it (``payload["subject_rank"]`` by convention).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedgspo.runfiles import write_json_atomic
from fedgspo import runfiles

AUDIT_FILE = runfiles.AUDIT
HEAD_FILE = runfiles.AUDIT_HEAD
GENESIS = "0" * 64

# Kinds of record; free-form kinds are allowed, these are the ones fedgspo writes.
RUN_START = "run_start"
ENTITY_WRITE = "entity_write"
CHECKPOINT = "checkpoint"
RESUME = "resume"
CHECKPOINT_SKIPPED = "checkpoint_skipped"
HOT_SWAP = "hot_swap"
DETECTION = "detection"
QUARANTINE = "quarantine"
RELEASE = "release"
AUTH_FAILURE = "auth_failure"
PROOF_FAILURE = "proof_failure"
OPERATOR_REQUEST = "operator_request"
REQUEST_REJECTED = "request_rejected"
RUN_END = "run_end"
PREEMPTED = "preempted"


class AuditError(RuntimeError):
    """The audit log is broken; :attr:`line` is the 1-based line number of the first bad line
    (0 when the problem is the head file)."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {reason}")
        self.line = line


def canonical_json(obj: Any) -> bytes:
    """The byte form that is hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``record`` without its ``hash`` field."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _head_mac(key: bytes | None, seq: object, last_hash: object) -> str | None:
    if key is None:
        return None
    return hmac.new(key, f"fedgspo-audit-head:{seq}:{last_hash}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class AuditSummary:
    """What :func:`verify_audit_log` found in a valid log."""

    records: int
    last_hash: str
    head_checked: bool


def verify_audit_log(path: Path, key: bytes | None = None) -> AuditSummary:
    """Check every line's hash, sequence number and link to the previous line, then the head.

    Raises :class:`AuditError` naming the first bad line: an edited line fails its own hash;
    a removed or reordered line fails its ``seq``/``prev_hash`` check; a truncated tail, or
    a head whose HMAC does not verify under ``key``, is reported against the head file.
    A missing head file is accepted (a log copied without it), and ``head_checked`` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise AuditError(path, 0, "audit log missing")
    prev, seq = GENESIS, -1
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise AuditError(path, lineno, "not valid JSON") from None
            if not isinstance(record, dict) or "hash" not in record:
                raise AuditError(path, lineno, "not an audit record")
            if record_hash(record) != record["hash"]:
                raise AuditError(path, lineno, "hash does not match the record (edited)")
            if record.get("seq") != seq + 1 or record.get("prev_hash") != prev:
                raise AuditError(path, lineno, f"chain broken: expected seq {seq + 1} after "
                                               "the previous line (a line was removed or reordered)")
            prev, seq = record["hash"], record["seq"]
    head_path = path.with_name(HEAD_FILE)
    if not head_path.is_file():
        return AuditSummary(seq + 1, prev, head_checked=False)
    try:
        head = json.loads(head_path.read_text())
    except json.JSONDecodeError:
        raise AuditError(head_path, 0, "not valid JSON") from None
    expected_mac = _head_mac(key, head.get("seq"), head.get("hash"))
    if key is not None and not hmac.compare_digest(str(head.get("mac")), str(expected_mac)):
        raise AuditError(head_path, 0, "HMAC does not verify under the admin key")
    if head.get("seq") != seq or head.get("hash") != prev:
        raise AuditError(path, seq + 2, f"log ends at seq {seq} but the head records seq {head.get('seq')} "
                                        "(lines removed from the end)")
    return AuditSummary(seq + 1, prev, head_checked=True)


class AuditSink(Protocol):
    """What records audit entries: an :class:`AuditLog`, or rank 0's recorder appending to one
    on its writer thread (in call order)."""

    def append(self, kind: str, payload: dict[str, Any] | None = None, *, step: int | None = None,
               rank: int = 0) -> Any: ...


class AuditLog:
    """Appends hash-chained records to ``<run_dir>/audit.jsonl`` (rank 0 only).

    Opening an existing log verifies it and continues its chain. Each :meth:`append` writes
    one line with ``O_APPEND``, flushes and fsyncs it, then atomically rewrites the head.

    Failure behaviour: opening a broken log raises :class:`AuditError` (the caller must not
    continue writing to a log whose history cannot be trusted: stop, or start a new run
    directory); a failed write raises ``OSError`` and the record is lost; the chain state is
    advanced only after the line is on disk.
    """

    def __init__(self, run_dir: Path, *, key: bytes | None = None, rank: int = 0) -> None:
        if rank != 0:
            raise PermissionError("only rank 0 writes the audit log")
        self.path = Path(run_dir) / AUDIT_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = key
        if self.path.exists():
            summary = verify_audit_log(self.path, key)
            self._seq, self._prev = summary.records, summary.last_hash
        else:
            self._seq, self._prev = 0, GENESIS

    def __repr__(self) -> str:  # never shows the key
        return f"AuditLog({str(self.path)!r}, records={self._seq})"

    def append(self, kind: str, payload: dict[str, Any] | None = None, *, step: int | None = None,
               rank: int = 0) -> dict[str, Any]:
        """Append one record and return it. ``payload`` must be JSON-serialisable (``TypeError``
        otherwise, nothing written). ``rank`` is the rank the record is about or came from."""
        record: dict[str, Any] = {"seq": self._seq, "time": time.time(), "rank": rank, "step": step,
                                  "kind": kind, "payload": payload or {}, "prev_hash": self._prev}
        record["hash"] = record_hash(record)
        line = canonical_json(record) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._seq, self._prev = self._seq + 1, record["hash"]
        write_json_atomic(self.path.with_name(HEAD_FILE), {"seq": record["seq"], "hash": record["hash"],
                                                           "mac": _head_mac(self._key, record["seq"], record["hash"])})
        return record
