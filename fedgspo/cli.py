"""The ``fedgspo`` command line: one subcommand per operator task.

Read-only checks::

    fedgspo verify RUN_DIR | CHECKPOINT_DIR     # manifests and sha256 of every file
    fedgspo audit verify RUN_DIR [--keys K]      # hash chain of audit.jsonl (and its signed head)

Keys and signed requests to a running job (written into ``RUN/requests/``, applied by rank 0
at the next step boundary)::

    fedgspo keygen --ranks 4 --out keys.json [--split DIR]
    fedgspo hotswap RUN slot=name [slot=name ...] --keys keys.json
    fedgspo stop RUN --keys keys.json
    fedgspo quarantine RUN RANK --keys keys.json

Exit codes: 0 success, 1 a check failed (the message names the bad file or line),
2 invalid command line or unusable input. Errors are one line on stderr.

Adding a subcommand: decorate ``configure(parser)`` with ``@command(name, help)`` and
return the function that runs it; nothing else changes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedgspo.audit import AUDIT_FILE, AuditError, verify_audit_log
from fedgspo.auth import AuthError, generate_keyring, load_keyring, write_keyring, write_request
from fedgspo.checkpoint import CHECKPOINTS, MANIFEST, CheckpointError, verify_checkpoint

Runner = Callable[[argparse.Namespace], int]


class CommandFailed(Exception):
    """A check failed: exit 1 with this one-line message."""


class UsageError(Exception):
    """Unusable arguments or input: exit 2 with this one-line message."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], Runner]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str) -> Callable[[Callable[[argparse.ArgumentParser], Runner]],
                                               Callable[[argparse.ArgumentParser], Runner]]:
    """Register ``configure(parser) -> run`` as subcommand ``name`` (``ValueError`` if taken)."""
    def register(configure: Callable[[argparse.ArgumentParser], Runner]) -> Callable[[argparse.ArgumentParser], Runner]:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        COMMANDS[name] = Command(name, help, configure)
        return configure
    return register


# -- verify ----------------------------------------------------------------------------------------

def checkpoint_dirs(path: Path) -> list[Path]:
    """The checkpoint at ``path``, or every checkpoint (any directory with a manifest) of the
    run directory ``path``; :class:`UsageError` if there is none."""
    if (path / MANIFEST).exists():
        return [path]
    root = path / CHECKPOINTS
    found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if not found:
        raise UsageError(f"{path}: neither a checkpoint nor a run directory with checkpoints")
    return found


@command("verify", "check the manifest and sha256 of every file of a checkpoint or of every checkpoint of a run")
def _configure_verify(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("path", type=Path, help="run directory or checkpoint directory")

    def run(args: argparse.Namespace) -> int:
        dirs = checkpoint_dirs(args.path)
        for directory in dirs:
            try:
                manifest = verify_checkpoint(directory)
            except CheckpointError as err:
                raise CommandFailed(str(err)) from None
            print(f"ok  {directory}  step {manifest.get('step')}  {len(manifest['files'])} files")
        print(f"{len(dirs)} checkpoint(s) verified")
        return 0
    return run


# -- audit -----------------------------------------------------------------------------------------

def _admin_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return load_keyring(path).admin_key()
    except AuthError as err:
        raise UsageError(str(err)) from None


@command("audit", "audit log tools: `audit verify RUN_DIR`")
def _configure_audit(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("action", choices=["verify"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--keys", type=Path, default=None, help="key file: also check the head's HMAC")

    def run(args: argparse.Namespace) -> int:
        log = args.run_dir / AUDIT_FILE if args.run_dir.is_dir() else args.run_dir
        try:
            summary = verify_audit_log(log, _admin_key(args.keys))
        except AuditError as err:
            raise CommandFailed(str(err)) from None
        head = "head checked" if summary.head_checked else "no head file"
        print(f"ok  {log}  {summary.records} records, {head}")
        return 0
    return run


# -- keys and requests -----------------------------------------------------------------------------

@command("keygen", "write per-rank-pair update keys and an admin key (mode 0600)")
def _configure_keygen(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--ranks", type=int, required=True, help="world size")
    parser.add_argument("--out", type=Path, required=True, help="full key file (operator)")
    parser.add_argument("--split", type=Path, default=None, help="also write DIR/rank<r>.json with only rank r's keys")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")

    def run(args: argparse.Namespace) -> int:
        if args.ranks < 1:
            raise UsageError(f"--ranks must be >= 1, got {args.ranks}")
        keyring = generate_keyring(args.ranks)
        try:
            write_keyring(args.out, keyring, overwrite=args.force)
            if args.split:
                args.split.mkdir(parents=True, exist_ok=True, mode=0o700)
                for r in range(args.ranks):
                    write_keyring(args.split / f"rank{r}.json", keyring.for_rank(r), overwrite=args.force)
        except FileExistsError as err:
            raise UsageError(f"{err.filename}: exists; pass --force to overwrite") from None
        print(f"wrote keys for {args.ranks} ranks to {args.out}" + (f" and {args.split}/" if args.split else ""))
        return 0
    return run


def _request_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--keys", type=Path, default=os.environ.get("FEDGSPO_KEY_FILE"),
                        help="key file with the admin key (default: $FEDGSPO_KEY_FILE)")


def _send(args: argparse.Namespace, action: str, payload: dict) -> int:
    if args.keys is None:
        raise UsageError("--keys (or FEDGSPO_KEY_FILE) is required to sign a request")
    try:
        path = write_request(args.run_dir, _admin_key(Path(args.keys)), action, payload)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    print(f"signed {action} request written to {path}")
    return 0


@command("hotswap", "ask a running job to swap named callables (slot=name ...)")
def _configure_hotswap(parser: argparse.ArgumentParser) -> Runner:
    _request_parser(parser)
    parser.add_argument("swaps", nargs="+", metavar="slot=name")

    def run(args: argparse.Namespace) -> int:
        pairs = [s.partition("=") for s in args.swaps]
        if any(not slot or not sep or not name for slot, sep, name in pairs):
            raise UsageError("swaps must be of the form slot=name")
        return _send(args, "hotswap", {"swaps": {slot: name for slot, _, name in pairs}})
    return run


@command("stop", "ask a running job to checkpoint and stop at the next step boundary")
def _configure_stop(parser: argparse.ArgumentParser) -> Runner:
    _request_parser(parser)
    return lambda args: _send(args, "stop", {})


@command("quarantine", "ask a running job to quarantine a rank (weight 0, still monitored)")
def _configure_quarantine(parser: argparse.ArgumentParser) -> Runner:
    _request_parser(parser)
    parser.add_argument("rank", type=int)

    def run(args: argparse.Namespace) -> int:
        if args.rank < 0:
            raise UsageError(f"rank must be >= 0, got {args.rank}")
        return _send(args, "quarantine", {"rank": args.rank})
    return run


# -- entry point -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgspo", description="fedgspo operator tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub_parser = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        sub_parser.set_defaults(run=cmd.configure(sub_parser))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (0 ok, 1 check failed, 2 usage error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandFailed as err:
        print(f"fedgspo {args.command}: {err}", file=sys.stderr)
        return 1
    except UsageError as err:
        print(f"fedgspo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
