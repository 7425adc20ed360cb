"""Audit log: the chain continues across reopen; any edited, removed or reordered line, and a
truncated tail, is found and named by line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedgspo.integrity.audit import AUDIT_FILE, HEAD_FILE, AuditError, AuditLog, verify_audit_log

KEY = b"k" * 32


def write_log(run_dir: Path, records: int = 5) -> Path:
    log = AuditLog(run_dir, key=KEY)
    for i in range(records):
        log.append("checkpoint", {"path": f"step_{i}"}, step=i)
    return run_dir / AUDIT_FILE


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_reopen_continues_chain(tmp_path: Path) -> None:
    path = write_log(tmp_path, 3)
    log = AuditLog(tmp_path, key=KEY)
    record = log.append("resume", {"from": "step_2"}, step=3)
    assert record["seq"] == 3
    summary = verify_audit_log(path, KEY)
    assert summary.records == 4 and summary.head_checked
    assert "k" * 8 not in repr(log)


def test_edited_line_is_named(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    rows = lines(path)
    record = json.loads(rows[2])
    record["payload"]["path"] = "elsewhere"
    rows[2] = json.dumps(record) + "\n"
    path.write_text("".join(rows))
    with pytest.raises(AuditError, match=r"audit.jsonl:3: hash does not match") as err:
        verify_audit_log(path)
    assert err.value.line == 3


@pytest.mark.parametrize("mutate, line", [
    (lambda rows: rows[:1] + rows[2:], 2),  # removed line 2
    (lambda rows: [rows[0], rows[2], rows[1], *rows[3:]], 2),  # reordered lines 2 and 3
])
def test_removed_or_reordered_line_is_named(tmp_path: Path, mutate, line: int) -> None:
    path = write_log(tmp_path)
    path.write_text("".join(mutate(lines(path))))
    with pytest.raises(AuditError, match="chain broken") as err:
        verify_audit_log(path)
    assert err.value.line == line


def test_truncated_tail_is_found_through_the_head(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    path.write_text("".join(lines(path)[:-1]))
    with pytest.raises(AuditError, match="lines removed from the end") as err:
        verify_audit_log(path)
    assert err.value.line == 5


def test_forged_head_fails_under_the_key(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    path.write_text("".join(lines(path)[:-1]))
    previous = json.loads(lines(path)[-1])
    (tmp_path / HEAD_FILE).write_text(json.dumps({"seq": previous["seq"], "hash": previous["hash"], "mac": "0" * 64}))
    assert verify_audit_log(path).records == 4  # without the key a rewritten head is not detectable
    with pytest.raises(AuditError, match="HMAC"):
        verify_audit_log(path, KEY)


def test_broken_log_refuses_to_reopen_and_other_ranks_cannot_write(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    path.write_text("".join(lines(path)[1:]))
    with pytest.raises(AuditError):
        AuditLog(tmp_path, key=KEY)
    with pytest.raises(PermissionError):
        AuditLog(tmp_path / "other", rank=1)
