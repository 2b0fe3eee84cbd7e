"""One progress display for every long step: a tqdm bar on a terminal; anywhere else (a redirected console, CI) a
plain log line every 10 s and one at the end, never a carriage-return bar that a log file keeps as one huge line.

The lines go through the `medplib.progress` logger, so the command's log file records them either way; on a
terminal they are marked `console=False` and the console shows the bar instead (see medplib.run_log).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

EVERY_S = 10.0  # seconds between two progress lines when there is no bar
T = TypeVar("T")


def clock(seconds: float) -> str:
    """`1:40`, or `2:03:20` past an hour."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def timing(done: int, remaining: int, elapsed: float) -> str:
    """`elapsed 1:40, ETA 5:00`, the ETA at the pace of the `done` units this attempt ran in `elapsed` seconds."""
    return f"elapsed {clock(elapsed)}, ETA {clock(remaining * elapsed / max(done, 1))}"


def status_line(desc: str, unit: str, done: int, total: int, detail: str) -> str:
    return f"{desc}: {unit} {done}/{total} ({100 * done / max(total, 1):.0f}%), {detail}"


def progress_line(name: str, step: int, total: int, first_step: int, loss: float, samples_per_s: float,
                  elapsed: float) -> str:
    """One human line of a running training job: where it is, how fast, and when it should end (ETA from the steps
    done in this attempt, so a resumed job does not count the steps it skipped)."""
    return status_line(name, "step", step, total, training_detail(step, total, first_step, loss, samples_per_s,
                                                                  elapsed))


def training_detail(step: int, total: int, first_step: int, loss: float, samples_per_s: float,
                    elapsed: float) -> str:
    return f"loss {loss:.4f}, {samples_per_s:.1f} samples/s, " + timing(step - first_step, total - step, elapsed)


class StepProgress:
    """The progress of one step: `update(n)` from a loop, or `set(done, detail=…)` from a job that reports elsewhere
    (a training run's rank 0). A bar when `stream` is a terminal, else a line every `every_s` seconds and at close."""

    def __init__(self, desc: str, total: int, unit: str = "steps", every_s: float = EVERY_S, disable: bool = False,
                 stream: TextIO | None = None, now: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit, self.every_s, self.disable = desc, total, unit, every_s, disable
        self.now, self.done, self.detail = now, 0, None
        self.logged: int | None = None  # the position the last line showed
        self.t0 = self.last_line = now()
        stream = stream or sys.stderr
        self.bar = None
        if not disable and stream.isatty():
            # the postfix is our detail (rate, ETA or the job's own numbers); tqdm puts ", " before it
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}")

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int, total: int | None = None, detail: str | None = None) -> None:
        """Move to `done` (of `total`, if it changed); `detail` replaces the default pace text (rate, elapsed, ETA)."""
        if self.disable:
            return
        if total is not None and total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        delta, self.done, self.detail = done - self.done, done, detail
        if self.bar is not None:
            self.bar.set_postfix_str(self._detail(), refresh=False)
            self.bar.update(delta)  # tqdm redraws at most every 0.1 s however often this is called
        now = self.now()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self._log()

    def line(self) -> str:
        return status_line(self.desc, self.unit, self.done, self.total, self._detail())

    def close(self) -> None:
        """Close the bar; log where the step ended, unless the last line already said so."""
        if self.disable:
            return
        if self.bar is not None:
            self.bar.close()
        if self.logged != self.done:
            self._log()
        self.disable = True  # a second close() (an exception after an explicit close) logs nothing more

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _detail(self) -> str:
        if self.detail is not None:
            return self.detail
        elapsed = self.now() - self.t0
        return f"{self.done / max(elapsed, 1e-9):.1f} {self.unit}/s, " + timing(self.done, self.total - self.done,
                                                                             elapsed)

    def _log(self) -> None:
        self.logged = self.done
        log.info(self.line(), extra={"console": self.bar is None})  # on a terminal the bar already shows it


def track(items: Iterable[T], desc: str, unit: str, total: int | None = None, disable: bool = False) -> Iterator[T]:
    """`for x in track(xs, "ingest", "records")`: StepProgress over an iterable, as `tqdm(xs, …)` would be."""
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    with StepProgress(desc, total, unit, disable=disable) as progress:
        for item in items:
            yield item
            progress.update()
