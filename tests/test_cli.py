"""The fedgspo command line: exit codes and one-line errors of verify, audit verify, keygen
and the signed requests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedgspo.integrity.audit import AUDIT_FILE, AuditLog
from fedgspo.integrity.auth import RequestInbox, load_keyring
from fedgspo.checkpoint import CheckpointConfig, CheckpointManager, list_checkpoints
from fedgspo.cli.main import COMMANDS, command, main


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(tmp_path / "run", CheckpointConfig(every=1))
    for step in (1, 2):
        mgr.save(step, model, opt, None, {"step": step})
    log = AuditLog(tmp_path / "run")
    for step in range(3):
        log.append("checkpoint", {"step": step}, step=step)
    return tmp_path / "run"


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_verify_ok_and_names_the_bad_file(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(run_dir)]) == 0
    assert "2 checkpoint(s) verified" in capsys.readouterr().out
    bad = list_checkpoints(run_dir)[0] / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-1] + b"\0")
    assert main(["verify", str(run_dir)]) == 1
    assert f"{bad}: sha256 does not match the manifest" in one_line_error(capsys)
    assert main(["verify", str(list_checkpoints(run_dir)[1])]) == 0
    capsys.readouterr()
    assert main(["verify", str(run_dir / "nothing")]) == 2
    assert "neither a checkpoint nor a run directory" in one_line_error(capsys)


def test_audit_verify(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "verify", str(run_dir)]) == 0
    log = run_dir / AUDIT_FILE
    rows = log.read_text().splitlines(keepends=True)
    log.write_text(rows[0] + rows[2])
    assert main(["audit", "verify", str(run_dir)]) == 1
    assert f"{log}:2: chain broken" in one_line_error(capsys)


def test_keygen_and_signed_requests(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    keys = tmp_path / "keys.json"
    assert main(["keygen", "--ranks", "4", "--out", str(keys), "--split", str(tmp_path / "split")]) == 0
    assert os.stat(keys).st_mode & 0o777 == 0o600
    assert load_keyring(keys).world_size == 4 and (tmp_path / "split" / "rank3.json").exists()
    capsys.readouterr()
    assert main(["keygen", "--ranks", "4", "--out", str(keys)]) == 2
    assert "exists; pass --force" in one_line_error(capsys)
    assert main(["keygen", "--ranks", "0", "--out", str(tmp_path / "k2.json")]) == 2
    capsys.readouterr()

    assert main(["hotswap", str(run_dir), "reward=exact_match", "--keys", str(keys)]) == 0
    assert main(["quarantine", str(run_dir), "2", "--keys", str(keys)]) == 0
    assert main(["stop", str(run_dir), "--keys", str(keys)]) == 0
    inbox = RequestInbox(run_dir, load_keyring(keys).admin_key(), None)
    assert [(r.action, r.args) for r in inbox.poll()] == [
        ("hotswap", {"swaps": {"reward": "exact_match"}}), ("quarantine", {"rank": 2}), ("stop", {})]
    capsys.readouterr()
    assert main(["stop", str(run_dir), "--keys", str(tmp_path / "split" / "rank1.json")]) == 2
    assert "no admin key" in one_line_error(capsys)
    assert main(["hotswap", str(run_dir), "bad", "--keys", str(keys)]) == 2
    assert "slot=name" in one_line_error(capsys)
    assert json.loads(keys.read_text())["world_size"] == 4


def test_adding_a_subcommand() -> None:
    @command("hello-test", "say hello")
    def configure(parser):
        parser.add_argument("name")
        return lambda args: 0 if args.name == "x" else 1

    try:
        assert main(["hello-test", "x"]) == 0 and main(["hello-test", "y"]) == 1
        with pytest.raises(ValueError, match="already registered"):
            command("hello-test", "again")(configure)
    finally:
        COMMANDS.pop("hello-test")
