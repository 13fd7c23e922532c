"""results.json and results.md: every figure with its samples, the machine and the date."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import Failure, Figure, Machine, Run


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _met(figure: Figure) -> str:
    return {None: "-", True: "yes", False: "**no**"}[figure.met]


def _run_lines(run: Run, label: str) -> list[str]:
    machine = run.machine
    return [
        f"- {label}date: {machine.date}; commit {machine.commit}",
        f"  - machine: {machine.nproc} CPUs ({machine.cpu}), {machine.memory_gb} GiB, kernel {machine.kernel}, "
        f"Python {machine.python}",
        f"  - load average before/after: {' '.join(f'{v:.2f}' for v in machine.load_before)} / "
        + (" ".join(f"{v:.2f}" for v in machine.load_after) if machine.load_after else "-"),
        f"  - every figure: the median of {run.reps} repetitions, crfs and its baseline interleaved in the same run",
    ]


def markdown(runs: list[Run], figures: list[Figure], failures: list[Failure], extras: dict[str, Any]) -> str:
    lines = ["# crfs benchmark results", ""]
    for run in runs:
        label = f"{', '.join(run.benchmarks)}: " if len(runs) > 1 else ""
        lines += _run_lines(run, label)
    lines += [
        "",
        "| benchmark | measure | crfs | baseline | ratio | target | met? |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        lines.append(
            f"| {f.bench} | {f.name} | {_number(f.crfs_median)} {f.unit} | {_number(f.baseline_median)} {f.unit} "
            f"({f.baseline_name}) | {_number(f.ratio)} | {f.target.text(f.unit) if f.target else '-'} "
            f"| {_met(f)} |")
    if failures:
        lines += ["", "## Not measured", ""]
        lines += [f"- {fail.bench}: {fail.reason}" for fail in failures]
    notes = [f for f in figures if f.notes]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {f.bench} {f.name}: {f.notes}" for f in notes]
    if extras:
        lines += ["", "## Recorded facts", ""]
        for key, value in extras.items():
            if isinstance(value, dict):
                lines.append(f"- {key}:")
                lines += [f"  - {k}: `{json.dumps(v, default=str)}`" for k, v in value.items()]
            else:
                lines.append(f"- {key}: `{json.dumps(value, default=str)}`")
    return "\n".join(lines) + "\n"


def _earlier(out: Path, rerun: set[str]) -> tuple[list[Run], list[Figure], list[Failure], dict[str, Any]]:
    """What out/results.json holds of the benchmarks not measured again now."""
    try:
        data = json.loads((out / "results.json").read_text())
    except FileNotFoundError:
        return [], [], [], {}
    if "runs" in data:
        runs = [Run.from_dict(r) for r in data["runs"]]
    else:  # written before runs were recorded: one run of every benchmark it has figures of
        benchmarks = sorted({f["bench"] for f in data["figures"]} | {f["bench"] for f in data["failures"]})
        runs = [Run(benchmarks, Machine.from_dict(data["machine"]), data["repetitions"])]
    kept_runs = []
    for run in runs:
        benchmarks = [name for name in run.benchmarks if name not in rerun]
        if benchmarks:
            kept_runs.append(Run(benchmarks, run.machine, run.reps))
    figures = [Figure.from_dict(f) for f in data["figures"] if f["bench"] not in rerun]
    failures = [Failure(**f) for f in data["failures"] if f["bench"] not in rerun]
    return kept_runs, figures, failures, data.get("facts", {})


def write(out: Path, run: Run, figures: list[Figure], failures: list[Failure], extras: dict[str, Any],
          update: bool = False) -> tuple[Path, Path]:
    """Writes results.json and results.md; with `update`, the figures of benchmarks this run
    did not measure are kept from the earlier results in `out`, each with its own run."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [run]
    if update:
        old_runs, old_figures, old_failures, old_facts = _earlier(out, set(run.benchmarks))
        runs = old_runs + runs
        figures = [*old_figures, *figures]
        failures = [*old_failures, *failures]
        extras = {**old_facts, **extras}
    order = {name: number for number, name in enumerate(sorted({f.bench for f in figures}))}
    figures = sorted(figures, key=lambda f: order[f.bench])  # stable: each benchmark's own order
    data = {"runs": [r.as_dict() for r in runs], "figures": [f.as_dict() for f in figures],
            "failures": [asdict(f) for f in failures], "facts": extras}
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md_path.write_text(markdown(runs, figures, failures, extras))
    return json_path, md_path
