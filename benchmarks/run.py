"""Run every benchmark, or the named ones, and collect their results into one JSON file.

    python benchmarks/run.py                      # all of them (robustness alone takes ~50 min)
    python benchmarks/run.py --quick              # the cheap ones in quick mode (a few minutes)
    python benchmarks/run.py gspo_overhead vs_trl # by name, full size
    python benchmarks/run.py --list

Each benchmark runs as its own process (under ``torchrun`` where it needs several ranks), prints
its table and writes its own JSON (machine, versions, samples, medians and spreads). The runner
then prints a summary table and writes ``<results>/suite.json``: machine info and, per run, the
command, exit code, wall time and the benchmark's JSON. ``vs_trl`` runs with the interpreter
named by ``--trl-python`` (default ``$FEDGSPO_TRL_PYTHON`` or this one) and is skipped when TRL
is not importable there. Exit code 1 when a benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    """One benchmark script: how to launch it, its quick mode, and where its JSON goes."""

    script: str
    nprocs: tuple[int, ...] = (1,)  # one run per process count; > 1 runs under torchrun
    args: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=lambda: ["--quick"])
    cheap: bool = True  # part of `run --quick` without names
    out_folder: bool = False  # its --out names a folder it writes <name>.json into
    trl: bool = False  # needs the TRL interpreter

    def out_path(self, name: str, nproc: int, results: Path) -> Path:
        suffix = f"_{nproc}p" if len(self.nprocs) > 1 else ""
        return results / f"{name}{suffix}.json"


BENCHMARKS: dict[str, Bench] = {
    "gspo_overhead": Bench("gspo_overhead.py", nprocs=(1, 2)),
    "profile_step": Bench("profile_step.py", nprocs=(1, 2)),
    "generation": Bench("generation.py"),
    "vs_trl": Bench("vs_trl.py", trl=True, cheap=False),
    "vs_trl_parity": Bench("vs_trl.py", args=["--parity"], trl=True, cheap=False),
    "aggregation": Bench("aggregation.py", nprocs=(4,), quick=["--sizes", "100000", "--reps", "3"]),
    "entities": Bench("entities.py"),
    "integrity": Bench("integrity.py", quick=["--repeats", "2"]),
    "detection_calibration": Bench("detection_calibration.py", cheap=False),
    "detection": Bench("detection.py", cheap=False),
    "robustness": Bench("robustness.py", cheap=False, out_folder=True),
    "protocol": Bench("protocol.py"),
    "real_model": Bench("real_model.py", cheap=False),
    "preemption": Bench("preemption.py", cheap=False),
    "federated": Bench("federated.py", cheap=False, out_folder=True),
}


def trl_available(python: str) -> bool:
    """Whether ``python`` can import TRL."""
    return subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0


def command(name: str, bench: Bench, nproc: int, quick: bool, results: Path, python: str) -> tuple[list[str], Path]:
    """The command line of one run and the JSON file it writes."""
    out = bench.out_path(name, nproc, results)
    target = results if bench.out_folder else out
    launcher = [python] if nproc == 1 else [python, "-m", "torch.distributed.run", "--standalone",
                                            f"--nproc_per_node={nproc}"]
    cmd = launcher + [str(HERE / bench.script), *bench.args, *(bench.quick if quick else []), "--out", str(target)]
    return cmd, out


def run_one(cmd: list[str], timeout: float) -> tuple[int, float]:
    """Run ``cmd`` with its output passed through; exit code (124 on timeout) and seconds."""
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, timeout=timeout, cwd=HERE.parent).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    return rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all; with --quick the cheap ones): "
                                                 f"{', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="quick mode of every benchmark run")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for every JSON file")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per benchmark run")
    parser.add_argument("--trl-python", default=os.environ.get("FEDGSPO_TRL_PYTHON", sys.executable),
                        help="interpreter with TRL installed, for vs_trl")
    args = parser.parse_args(argv)
    if args.list:
        for name, bench in BENCHMARKS.items():
            print(f"{name:22s} {bench.script:26s} processes {','.join(map(str, bench.nprocs)):6s} "
                  f"{'cheap' if bench.cheap else 'long'}")
        return 0
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    names = args.names or [n for n, b in BENCHMARKS.items() if b.cheap or not args.quick]

    runs: list[dict[str, Any]] = []
    for name in names:
        bench = BENCHMARKS[name]
        python = args.trl_python if bench.trl else sys.executable
        for nproc in bench.nprocs:
            cmd, out = command(name, bench, nproc, args.quick, args.results, python)
            record: dict[str, Any] = {"name": name, "processes": nproc, "command": cmd, "json": str(out)}
            if bench.trl and not trl_available(python):
                record.update(status="skipped", reason=f"TRL is not importable by {python} (see --trl-python)")
            else:
                print(f"\n## {name} ({nproc} process{'es' if nproc > 1 else ''})\n", flush=True)
                out.unlink(missing_ok=True)
                rc, seconds = run_one(cmd, args.timeout)
                ok = rc == 0 and out.exists()
                record.update(status="ok" if ok else "failed", exit_code=rc, seconds=seconds,
                              result=json.loads(out.read_text()) if ok else None)
            runs.append(record)

    print("\n## summary\n")
    print(markdown_table(["benchmark", "processes", "status", "seconds", "JSON"],
                         [[r["name"], r["processes"], r["status"], r.get("seconds", 0.0), r["json"]] for r in runs]))
    suite = write_json(args.results / "suite.json", {"quick": args.quick, "runs": runs})
    print(f"\nwrote {suite}")
    return 1 if any(r["status"] == "failed" for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
