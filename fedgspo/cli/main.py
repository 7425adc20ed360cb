"""The ``fedgspo`` command line: one subcommand per operator task.

Read-only checks::

    fedgspo verify RUN_DIR | CHECKPOINT_DIR     # manifests and sha256 of every file
    fedgspo audit verify RUN_DIR [--keys K]      # hash chain of audit.jsonl (and its signed head)

Keys and signed requests to a running job (written into ``RUN/requests/``, applied by rank 0
at the next step boundary)::

    fedgspo keygen --ranks 4 --out keys.json [--split DIR]
    fedgspo hotswap RUN slot=name [slot=name ...] --keys keys.json
    fedgspo stop RUN --keys keys.json
    fedgspo quarantine RUN RANK --keys keys.json     # held until: fedgspo release RUN RANK --keys keys.json

Reading run directories (``runs/`` by default)::

    fedgspo runs [DIR]                           # every run: status, steps, last reward, start
    fedgspo show RUN                             # config highlights, reward, flags, checkpoints
    fedgspo lineage RUN [--dot F] [--png F]      # checkpoint tree across resumes, pipeline stages
    fedgspo reputation RUN [--history]           # per-rank trust, flags, quarantine
    fedgspo events RUN [--follow] [--kind K]     # events.jsonl, optionally tailed
    fedgspo plot RUN [--out F]                   # reward, loss and per-rank trust as PNG

Exit codes: 0 success, 1 a check failed (the message names the bad file or line),
2 invalid command line or unusable input. Errors are one line on stderr.

Adding a subcommand: decorate ``configure(parser)`` with ``@command(name, help)`` and
return the function that runs it; nothing else changes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fedgspo.integrity.audit import AUDIT_FILE, RUN_START, AuditError, verify_audit_log
from fedgspo.integrity.auth import AuthError, generate_keyring, load_keyring, write_keyring, write_request
from fedgspo.checkpoint import CHECKPOINTS, MANIFEST, CheckpointError, verify_checkpoint
from fedgspo.cli.lineage import render_dot, render_png, render_text
from fedgspo.cli.rundir import (
    audit_records,
    STALE_AFTER_S,
    RunDirError,
    RunInfo,
    checkpoint_lineage,
    checkpoints_on_disk,
    final_reputation,
    follow_events,
    list_runs,
    metrics,
    read_config,
    read_events,
    read_summary,
    reputation_history,
    require_run_dir,
    run_info,
)

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


def _rank_request(action: str) -> Callable[[argparse.ArgumentParser], Runner]:
    def configure(parser: argparse.ArgumentParser) -> Runner:
        _request_parser(parser)
        parser.add_argument("rank", type=int)

        def run(args: argparse.Namespace) -> int:
            world = _world_size(args.run_dir)
            if args.rank < 0 or (world is not None and args.rank >= world):
                raise UsageError(f"rank {args.rank} is outside 0..{world - 1 if world else 'n-1'} of {args.run_dir}")
            return _send(args, action, {"rank": args.rank})
        return run
    return configure


def _world_size(run_dir: Path) -> int | None:
    """The run's world size from its audit log (the latest start), if it has started."""
    starts = audit_records(run_dir, RUN_START) if run_dir.is_dir() else []
    return int(starts[-1]["payload"]["world_size"]) if starts else None


command("quarantine", "ask a running job to quarantine a rank until released (weight 0, still monitored)")(
    _rank_request("quarantine"))
command("release", "ask a running job to release a rank an operator quarantined")(_rank_request("release"))


# -- run directories -------------------------------------------------------------------------------

def _need_matplotlib(what: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{what} needs matplotlib: pip install 'fedgspo[plot]'")


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _when(info: RunInfo) -> str:
    return info.started.astimezone().strftime("%Y-%m-%d %H:%M:%S") if info.started else "-"


def _run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory (e.g. runs/my-run)")


@command("runs", "list the run directories under DIR (default runs/) with status, steps, last reward and start time")
def _configure_runs(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("root", type=Path, nargs="?", default=Path("runs"), metavar="DIR")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER_S, metavar="S",
                        help="a run marked running with no write for S seconds is shown as crashed (default %(default)s)")

    def run(args: argparse.Namespace) -> int:
        infos = list_runs(args.root, stale_after_s=args.stale_after)
        rows = [("RUN", "STATUS", "STEPS", "REWARD", "RANKS", "STARTED")]
        rows += [(str(i.path.relative_to(args.root)), i.status,
                  f"{i.steps}/{i.total_steps}" if i.total_steps else str(i.steps),
                  _fmt(i.last_reward), str(i.world_size or "-"), _when(i)) for i in infos]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        print(f"{len(infos)} run(s) in {args.root}")
        return 0
    return run


def _config_line(cfg: dict, rule_used: str | None = None) -> str:
    """One line of config highlights; ``rule_used``: the aggregator's spec from the run's
    summary, which names the rule ``auto`` picked."""
    model, task, gspo, agg = (cfg.get(k) or {} for k in ("model", "task", "gspo", "aggregation"))
    rule = agg.get("rule")
    if rule == "auto" and rule_used:
        rule = f"auto->{rule_used.split('(')[0]}"
    attack = cfg.get("attack") or {}
    built = f"{model.get('arch')} h{model.get('hidden_size')} L{model.get('num_layers')}"
    lora = f" +LoRA r={model['lora'].get('r')}" if model.get("lora") else ""
    data = f"data {task['dataset']} ({task.get('partition', 'iid')})" if task.get("dataset") else f"task {task.get('name')}"
    parts = [f"model {model.get('path') or built}{lora}", data,
             f"rule {rule}/{agg.get('mode')} f={agg.get('f')}",
             f"lr {gspo.get('learning_rate')}", f"G={gspo.get('num_generations')}"]
    if attack:
        parts.append(f"attack {attack.get('kind')} on ranks {attack.get('ranks')}")
    return "  ".join(parts)


@command("show", "summarise a run: config highlights, steps, reward, flagged and quarantined ranks, checkpoints, weights")
def _configure_show(parser: argparse.ArgumentParser) -> Runner:
    _run_arg(parser)

    def run(args: argparse.Namespace) -> int:
        info = run_info(args.run_dir)
        summary = read_summary(args.run_dir) or {}
        records = metrics(args.run_dir)
        rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
        window = min(10, len(rewards)) or 1
        flagged: dict[int, int] = {}
        for r in records:
            for rank in r.get("flagged") or []:
                flagged[rank] = flagged.get(rank, 0) + 1
        quarantined = [r["rank"] for r in final_reputation(args.run_dir) if r.get("quarantined")]
        checkpoints = [f"{d.name} (step {m.get('step')})" for d, m in checkpoints_on_disk(args.run_dir)]
        hashes = set(summary.get("weights_sha256_per_rank") or [])
        print(f"run          {args.run_dir}")
        print(f"status       {info.status}, step {info.steps}/{info.total_steps or '?'}, "
              f"{info.world_size or '?'} rank(s), started {_when(info)}")
        print(f"config       {_config_line(read_config(args.run_dir), summary.get('rule'))}")
        if rewards:
            print(f"reward       {sum(rewards[:window]) / window:.3f} (first {window} steps) -> "
                  f"{sum(rewards[-window:]) / window:.3f} (last {window}); last step {rewards[-1]:.3f}")
        print("flagged      " + (", ".join(f"rank {k}: {v} step(s)" for k, v in sorted(flagged.items())) or "none"))
        print("quarantined  " + (", ".join(f"rank {k}" for k in quarantined) or "none"))
        print("checkpoints  " + (", ".join(checkpoints) or "none"))
        if summary.get("weights_sha256"):
            agree = "all ranks agree" if len(hashes) <= 1 else f"RANKS DISAGREE: {len(hashes)} hashes"
            print(f"weights      sha256 {summary['weights_sha256']} ({agree})")
        return 0
    return run


@command("lineage", "print the checkpoint lineage of a run (parents across resumes, pipeline stages); "
                    "--dot/--png write it as Graphviz DOT or a picture")
def _configure_lineage(parser: argparse.ArgumentParser) -> Runner:
    _run_arg(parser)
    parser.add_argument("--dot", type=Path, default=None, metavar="FILE", help="also write Graphviz DOT to FILE")
    parser.add_argument("--png", type=Path, default=None, metavar="FILE",
                        help="also draw it to FILE (Graphviz `dot` if on PATH, else matplotlib)")

    def run(args: argparse.Namespace) -> int:
        lineage = checkpoint_lineage(args.run_dir)
        print(render_text(lineage))
        if args.dot:
            args.dot.write_text(render_dot(lineage))
            print(f"wrote {args.dot}")
        if args.png:
            if shutil.which("dot") is None:
                _need_matplotlib("lineage --png without Graphviz")
            print(f"wrote {args.png} ({render_png(lineage, args.png)})")
        return 0
    return run


@command("reputation", "per-rank trust, flags and quarantine state of a run (--history: every change)")
def _configure_reputation(parser: argparse.ArgumentParser) -> Runner:
    _run_arg(parser)
    parser.add_argument("--history", action="store_true", help="also list every change per rank")

    def run(args: argparse.Namespace) -> int:
        require_run_dir(args.run_dir)
        ranks = final_reputation(args.run_dir)
        if not ranks:
            raise UsageError(f"{args.run_dir}: no reputation recorded (no summary.json, registry or events)")
        print("RANK  TRUST  FLAGS  QUARANTINED")
        for r in ranks:
            times = f" ({r['quarantines']}x)" if r.get("quarantines") else ""
            print(f"{r['rank']:>4}  {r['trust']:.3f}  {r['flags']:>5}  {'yes' if r['quarantined'] else 'no'}{times}")
        if args.history:
            for rank, points in reputation_history(args.run_dir).items():
                changes = "; ".join(f"step {p.step}: {p.trust:.3f}{' Q' if p.quarantined else ''}" for p in points)
                print(f"rank {rank}: {changes}")
        return 0
    return run


def _event_line(event: dict) -> str:
    when = datetime.fromtimestamp(event.get("timestamp", 0)).strftime("%H:%M:%S")
    skip = {"type", "event_id", "timestamp", "parent_id", "rank", "step", "metrics"}
    fields = " ".join(f"{k}={_fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in event.items()
                      if k not in skip and v is not None)
    step = f"step {event['step']:>5}  " if event.get("step") is not None else " " * 12
    return f"{when}  {step}{event.get('type', '?'):<22} {fields}".rstrip()


@command("events", "print a run's events.jsonl (--follow: keep printing new events, like tail -f)")
def _configure_events(parser: argparse.ArgumentParser) -> Runner:
    _run_arg(parser)
    parser.add_argument("--kind", action="append", default=None, metavar="TYPE",
                        help="only events of this type, e.g. ByzantineRankFlagged (repeatable)")
    parser.add_argument("--follow", "-f", action="store_true", help="wait for new events until interrupted")
    parser.add_argument("--poll", type=float, default=0.5, metavar="S", help="--follow polls every S seconds")
    parser.add_argument("--max-seconds", type=float, default=None, metavar="S", help="--follow stops after S seconds")
    parser.add_argument("--json", action="store_true", help="print the raw JSON lines")

    def run(args: argparse.Namespace) -> int:
        require_run_dir(args.run_dir)
        events = (follow_events(args.run_dir, args.kind, poll_s=args.poll, max_seconds=args.max_seconds)
                  if args.follow else read_events(args.run_dir, args.kind))
        try:
            for event in events:
                print(json.dumps(event) if args.json else _event_line(event), flush=args.follow)
        except KeyboardInterrupt:
            pass
        return 0
    return run


@command("plot", "draw a run's reward, loss and per-rank trust over steps as PNG (needs matplotlib)")
def _configure_plot(parser: argparse.ArgumentParser) -> Runner:
    _run_arg(parser)
    parser.add_argument("--out", type=Path, default=None, metavar="FILE", help="PNG file (default RUN/plot.png)")

    def run(args: argparse.Namespace) -> int:
        require_run_dir(args.run_dir)
        _need_matplotlib("plot")
        from fedgspo.cli.plot import plot_run

        print(f"wrote {plot_run(args.run_dir, args.out or args.run_dir / 'plot.png')}")
        return 0
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
    except (UsageError, RunDirError) as err:
        print(f"fedgspo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
