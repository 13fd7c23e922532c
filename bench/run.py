"""Runs the crfs benchmarks and writes results.json and results.md (see bench/README.md).

    .venv/bin/python bench/run.py [--only B4,B5] [--reps 3] [--out bench/results] [--quick]
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from bench.common import MIN_REPS, BenchContext, Failure, Figure, Machine, Run  # noqa: E402

BENCHMARKS = {
    "B1": "bench.b1_cold_start",
    "B2": "bench.b2_throughput",
    "B3": "bench.b3_metadata",
    "B4": "bench.b4_index",
    "B5": "bench.b5_convert",
}
DEFAULT_WORK = Path("/var/tmp/crfs-bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="crfs benchmarks: ratios against baselines measured in the same run")
    parser.add_argument("--only", default=",".join(BENCHMARKS), metavar="B1,B2,...",
                        help="which benchmarks (default: all)")
    parser.add_argument("--reps", type=int, default=MIN_REPS, help=f"repetitions per figure (>= {MIN_REPS})")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where results.json and results.md go (default: bench/results)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help=f"scratch space for registries, storage, generated blobs (default {DEFAULT_WORK})")
    parser.add_argument("--quick", action="store_true",
                        help="smaller stand-ins (B4: 100k entries; B5: minbase + python3): for trying the suite")
    parser.add_argument("--update", action="store_true",
                        help="keep the other benchmarks' figures from the results already in --out "
                             "(each stays stamped with its own run's date, commit and load)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="emulated link rate (default 100)")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="emulated link round trip (default 20)")
    args = parser.parse_args(argv)
    args.only = [name.strip().upper() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if args.reps < MIN_REPS:
        parser.error(f"--reps must be at least {MIN_REPS}: every figure is a median of >= {MIN_REPS} repetitions")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(args.work, args.reps, args.quick, args.rate_mbit, args.rtt_ms)
    machine = Machine.now()
    figures: list[Figure] = []
    failures: list[Failure] = []
    try:
        for name in args.only:
            module = importlib.import_module(BENCHMARKS[name])
            ctx.log(f"{name}: {module.TITLE}")
            try:
                got = module.run(ctx)
            except Exception as exc:  # one benchmark failing must not lose the others' figures
                traceback.print_exc()
                failures.append(Failure(name, f"{type(exc).__name__}: {exc}"))
                continue
            figures += got
            for figure in got:
                ctx.log(f"{name} {figure.name}: crfs {figure.crfs_median:.4g} {figure.unit}, baseline "
                        f"{figure.baseline_median:.4g} {figure.unit}, ratio {figure.ratio:.3g}, met: {figure.met}")
    finally:
        ctx.close()
        machine.finish()
        json_path, md_path = report.write(args.out, Run(args.only, machine, args.reps), figures, failures,
                                          ctx.extras, update=args.update)
        ctx.log(f"wrote {json_path} and {md_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
