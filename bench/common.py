"""What every benchmark shares: the figure a benchmark reports, its target, repetitions
and medians, the machine record, and the run context (work directory, options, shared
resources torn down at the end of the run)."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, TypeVar

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
MIN_REPS = 3

T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmark could not be measured (a step failed); the message says which."""


# ---------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Target:
    """A bound on a figure: on its ratio (crfs / baseline), e.g. `ratio <= 0.1`, or, where
    a benchmark states one, on the crfs value itself (`on="crfs"`, e.g. `<= 10 s`)."""

    op: str           # "<=" or ">="
    value: float
    on: str = "ratio"  # "ratio" or "crfs"

    def met(self, ratio: float, crfs: float) -> bool:
        measured = ratio if self.on == "ratio" else crfs
        return measured <= self.value if self.op == "<=" else measured >= self.value

    @classmethod
    def parse(cls, text: str | None) -> "Target | None":
        """The target `text` wrote ("ratio <= 0.1", "crfs <= 10 s"), for older results."""
        if not text:
            return None
        on, op, value, *_unit = text.split()
        return cls(op, float(value), on)

    def text(self, unit: str = "") -> str:
        if self.on == "ratio":
            return f"ratio {self.op} {self.value:g}"
        return f"crfs {self.op} {self.value:g} {unit}".rstrip()


@dataclass(frozen=True)
class Figure:
    """One row of the results: the median crfs value against the median baseline value
    measured in the same run. `higher_is_better` only affects how the ratio reads."""

    bench: str                 # "B4"
    name: str                  # what was measured
    unit: str                  # "s", "MB/s", "MB"
    crfs: list[float]          # every repetition
    baseline: list[float]
    baseline_name: str         # what the baseline is
    target: Target | None = None
    notes: str = ""

    @property
    def crfs_median(self) -> float:
        return statistics.median(self.crfs)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def ratio(self) -> float:
        base = self.baseline_median
        return self.crfs_median / base if base else float("inf")

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.ratio, self.crfs_median)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(crfs_median=self.crfs_median, baseline_median=self.baseline_median,
                    ratio=self.ratio, met=self.met,
                    target=None if self.target is None else self.target.text(self.unit),
                    target_bound=None if self.target is None else asdict(self.target))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Figure":
        """The figure `as_dict` wrote (an earlier run's results.json)."""
        bound = data.get("target_bound")
        target = Target(**bound) if bound else Target.parse(data.get("target"))
        return cls(data["bench"], data["name"], data["unit"], list(data["crfs"]), list(data["baseline"]),
                   data["baseline_name"], target, data.get("notes", ""))


@dataclass(frozen=True)
class Failure:
    """A benchmark that could not run to the end: reported, never silently dropped."""

    bench: str
    reason: str


# ---------------------------------------------------------------------------- repetitions


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def interleaved(reps: int, *actions: Callable[[], float]) -> list[list[float]]:
    """Runs each action once per repetition, in turn (A B A B A B rather than A A A B B B,
    so that a drift in the machine's load affects both sides alike); returns each
    action's samples."""
    samples: list[list[float]] = [[] for _ in actions]
    for _ in range(reps):
        for index, action in enumerate(actions):
            samples[index].append(action())
    return samples


# ---------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _git_commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+dirty" if dirty else "") if done.returncode == 0 else "unknown"


@dataclass
class Machine:
    """Where and when the figures were taken."""

    date: str
    nproc: int
    memory_gb: float
    kernel: str
    cpu: str
    python: str
    commit: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] | None = None

    @classmethod
    def now(cls) -> "Machine":
        return cls(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   nproc=os.cpu_count() or 0, memory_gb=round(_memory_bytes() / 2**30, 1),
                   kernel=platform.release(), cpu=_cpu_model(), python=platform.python_version(),
                   commit=_git_commit(), load_before=os.getloadavg())

    def finish(self) -> None:
        self.load_after = os.getloadavg()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Machine":
        after = data.get("load_after")
        return cls(**{**data, "load_before": tuple(data["load_before"]),
                      "load_after": tuple(after) if after else None})


@dataclass
class Run:
    """One invocation of bench/run.py: which benchmarks it measured, where and when."""

    benchmarks: list[str]
    machine: Machine
    reps: int

    def as_dict(self) -> dict[str, Any]:
        return {"benchmarks": self.benchmarks, "machine": asdict(self.machine), "repetitions": self.reps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Run":
        return cls(list(data["benchmarks"]), Machine.from_dict(data["machine"]), int(data["repetitions"]))


# ---------------------------------------------------------------------------- run context


@dataclass
class BenchContext:
    """Options of the run and resources benchmarks share (a registry, a link, a podman
    user): built on first use by `shared`, torn down by `close` in reverse order."""

    work: Path
    reps: int
    quick: bool = False
    rate_mbit: float = 100.0
    rtt_ms: float = 20.0
    extras: dict[str, Any] = field(default_factory=dict)     # facts to record (link self-check, sizes)
    _resources: ExitStack = field(default_factory=ExitStack, repr=False)
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def shared(self, key: str, factory: Callable[[], ContextManager[T]]) -> T:
        """The resource named `key`, entered once per run."""
        if key not in self._shared:
            self._shared[key] = self._resources.enter_context(factory())
        return self._shared[key]

    def record(self, key: str, value: Any) -> None:
        self.extras[key] = value

    def close(self) -> None:
        self._resources.close()

    def log(self, message: str) -> None:
        print(f"bench: {message}", flush=True)


def mb(value: int | float) -> float:
    return value / 1e6
