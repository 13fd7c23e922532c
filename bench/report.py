"""results.json and results.md: every figure with its samples, the machine and the date."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import Failure, Figure, Machine


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


def markdown(machine: Machine, reps: int, figures: list[Figure], failures: list[Failure],
             extras: dict[str, Any]) -> str:
    lines = [
        "# crfs benchmark results",
        "",
        f"- date: {machine.date}; commit {machine.commit}",
        f"- machine: {machine.nproc} CPUs ({machine.cpu}), {machine.memory_gb} GiB, kernel {machine.kernel}, "
        f"Python {machine.python}",
        f"- load average before/after: {' '.join(f'{v:.2f}' for v in machine.load_before)} / "
        + (" ".join(f"{v:.2f}" for v in machine.load_after) if machine.load_after else "-"),
        f"- every figure: the median of {reps} repetitions, crfs and its baseline interleaved in the same run",
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


def write(out: Path, machine: Machine, reps: int, figures: list[Figure], failures: list[Failure],
          extras: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": asdict(machine), "repetitions": reps, "figures": [f.as_dict() for f in figures],
            "failures": [asdict(f) for f in failures], "facts": extras}
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md_path.write_text(markdown(machine, reps, figures, failures, extras))
    return json_path, md_path
