"""A study's stages: each runs the project's own commands, prints its wall time and the time left.

Written for a log file as much as for a terminal: plain lines only (no carriage-return bars), a
heartbeat with each fine-tune's iteration every ``heartbeat`` seconds while its output goes to its
own log, and after every stage the time spent and an estimate of the time left. The estimate is
the plan's own seconds (measured on the README's 2-core machine) scaled by how fast this machine
has been so far, so a machine twice as slow sees twice the remaining time after the first stage.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import SparkDetError
from ..train.progress import format_eta


class StageError(SparkDetError):
    """A stage's command failed; the message carries the tail of its log, the exit code is the stage's."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code if 1 <= exit_code <= 5 else 1


@dataclass
class Job:
    """One command of a stage; ``log`` receives its output (None: the study's own output)."""

    label: str
    cmd: list
    log: Optional[Path] = None
    total_iters: int = 0  # for the heartbeat: iterations the command will run


# Iteration counters in the frameworks' own log lines: Detectron2 "iter: 59", MMEngine "Iter(train) [60/300]".
_ITERATION = re.compile(r"(?:\biter: (\d+))|(?:Iter\(train\) \[\s*(\d+)/)")


def iterations_done(log: Path) -> int:
    """The last iteration a fine-tune's log reports (Detectron2 counts from 0), 0 before the first."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 20000))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return 0
    found = [int(a) + 1 if a else int(b) for a, b in _ITERATION.findall(tail)]
    return found[-1] if found else 0


@dataclass
class Stages:
    """Runs the planned stages in order. ``plan``: stage name -> estimated seconds on the reference machine."""

    plan: dict[str, float]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Optional[Path] = None
    heartbeat: float = 30.0
    times: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start = time.time()
        self.order = list(self.plan)  # stage numbers stay put when a finished stage is skipped

    def add(self, plan: dict[str, float]) -> None:
        """Plan more stages (after those planned so far)."""
        self.plan.update(plan)
        self.order += [name for name in plan if name not in self.order]

    def skip(self, name: str, why: str) -> None:
        """A stage with nothing left to do (finished by an earlier, interrupted run): not timed, not planned."""
        self.plan.pop(name, None)
        print(f"\n=== [{self.order.index(name) + 1}/{len(self.order)}] {name}: {why}, skipped "
              f"(about {format_eta(self.seconds_left())} left)", flush=True)

    def slowness(self) -> float:
        """Actual over planned seconds of the finished stages (1 before the first)."""
        done_plan = sum(self.plan[name] for name in self.times)
        return sum(self.times.values()) / done_plan if done_plan > 0 else 1.0

    def seconds_left(self) -> float:
        """The unfinished stages' planned seconds, scaled by this machine's slowness so far."""
        return self.slowness() * sum(s for name, s in self.plan.items() if name not in self.times)

    def _begin(self, name: str) -> float:
        index = self.order.index(name) + 1
        print(f"\n=== [{index}/{len(self.order)}] {name} (about {format_eta(self.slowness() * self.plan[name])}; "
              f"study about {format_eta(self.seconds_left())} left)", flush=True)
        return time.time()

    def _end(self, name: str, t0: float) -> None:
        self.times[name] = time.time() - t0
        print(f"=== {name}: {self.times[name]:.0f} s (study {format_eta(time.time() - self.start)} so far, "
              f"about {format_eta(self.seconds_left())} left)", flush=True)

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = self._begin(name)
        result = fn()
        self._end(name, t0)
        return result

    def run(self, name: str, jobs: list[Job], threads_per_job: Optional[int] = None,
            max_parallel: Optional[int] = None) -> None:
        """Run ``jobs`` side by side, at most ``max_parallel`` at once (all by default), each with
        ``threads_per_job`` CPU threads; all must succeed."""
        t0 = self._begin(name)
        env = {**os.environ, **self.env}
        if threads_per_job:
            env.update(OMP_NUM_THREADS=str(threads_per_job), MKL_NUM_THREADS=str(threads_per_job))
        waiting, running = list(jobs), []
        try:
            while True:
                while waiting and len([r for r in running if r[2].poll() is None]) < (max_parallel or len(jobs)):
                    running.append(self._start(waiting.pop(0), env))
                self._wait(running, t0, until_one_ends=bool(waiting))
                if not waiting:
                    break
        finally:
            for _, out, proc in running:
                if proc.poll() is None:  # another job failed (or Ctrl-C): stop the rest
                    proc.terminate()
                    proc.wait()
                if out is not None:
                    out.close()
        self._end(name, t0)

    def _start(self, job: Job, env: dict[str, str]) -> tuple:
        print("$ " + " ".join(map(str, job.cmd)), flush=True)
        out = None
        if job.log is not None:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(job.log, "w")
        return job, out, subprocess.Popen(list(map(str, job.cmd)), cwd=self.cwd, env=env, stdout=out,
                                          stderr=subprocess.STDOUT if out else None)

    def _wait(self, running: list, t0: float, until_one_ends: bool = False) -> None:
        """Until every job has ended (or, with ``until_one_ends``, until one of the running ones has)."""
        last_beat = time.time()
        active = [proc for _, _, proc in running if proc.poll() is None]
        while True:
            for job, _, proc in running:
                code = proc.poll()
                if code not in (None, 0):
                    tail = job.log.read_text(errors="replace")[-3000:] if job.log else ""
                    where = f" - log {job.log}" if job.log else ""
                    raise StageError(f"'{job.label}' failed (exit {code}){where}\n{tail}", code)
            if all(proc.poll() == 0 for _, _, proc in running):
                return
            if until_one_ends and any(proc.poll() is not None for proc in active):
                return
            if time.time() - last_beat >= self.heartbeat and any(job.total_iters for job, _, _ in running):
                last_beat = time.time()
                states = [f"{job.label} iter {iterations_done(job.log)}/{job.total_iters}"
                          for job, _, proc in running
                          if job.log is not None and job.total_iters and proc.poll() is None]
                print(f"    {format_eta(time.time() - t0)}: " + ", ".join(states), flush=True)
            time.sleep(0.5)
