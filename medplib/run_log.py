"""Where a command's messages go. The console gets medplib's own lines (progress, results), the Prefect flow and
task lines that say which step runs, and any warning or error; the command's log file `<home>/logs/<command>-
<time>.log` gets everything at INFO: Prefect, Ray, MLflow, DVC, Python warnings. Ray's workers write to Ray's
session folder, which the run log points at once a Ray session starts (`note_ray_session`).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from medplib.config import Home

# Loggers whose INFO lines the console shows; everything else shows from WARNING on.
CONSOLE_INFO = ("medplib", "flows", "prefect.flow_runs", "prefect.task_runs")
# Libraries that give their logger a handler of its own and stop propagation, writing past the process's logging:
# while a run log is open their records go through it instead (MLflow does not when MLFLOW_CONFIGURE_LOGGING is
# false before its import, which the CLI sets).
SELF_HANDLED = ("ray", "DeepSpeed", "mlflow")


class ConsoleFilter(logging.Filter):
    """What the console shows: CONSOLE_INFO at INFO, the rest from WARNING, never Python `warnings` (deprecations,
    per-call FutureWarnings: the log file has them) nor records marked `extra={"console": False}`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True) or record.name == "py.warnings":
            return False
        return record.levelno >= logging.WARNING or any(
            record.name == name or record.name.startswith(name + ".") for name in CONSOLE_INFO)


class _RunFormatter(logging.Formatter):
    """`INFO medplib.x: message`; a Prefect run logger is named by its run (`task run 'train-stage-1'`)."""

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if run and record.name.startswith("prefect."):
            kind = "task run" if getattr(record, "task_run_name", None) else "flow run"
            record.where = f"{kind} {run!r}"
        else:
            record.where = record.name
        return super().format(record)


@dataclass
class RunLog:
    """The files one command wrote its messages to."""

    file: Path
    ray_logs: Path | None = None  # Ray's session logs (workers, Ray Train, DeepSpeed), once a session started

    def to_dict(self) -> dict:
        return {"log_file": str(self.file), "ray_logs": str(self.ray_logs) if self.ray_logs else None}

    def text(self) -> str:
        ray = f"; Ray worker logs in {self.ray_logs}" if self.ray_logs else ""
        return f"Full log: {self.file}{ray}"


_open: list[RunLog] = []  # the run logs open in this process, innermost last


@contextmanager
def console_logging(stream: TextIO | None = None) -> Iterator[None]:
    """The console half: filtered lines on `stream` (stderr); undone on exit (tests call the CLI in-process)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_RunFormatter("%(levelname)s %(where)s: %(message)s"))
    handler.addFilter(ConsoleFilter())
    with _root_handler(handler, logging.INFO):
        yield


@contextmanager
def run_log(home: Home, command: str) -> Iterator[RunLog]:
    """The file half: every record at INFO (and Python warnings) into a new `<home>/logs/<command>-<time>.log`."""
    home.logs.mkdir(parents=True, exist_ok=True)
    stem = f"{command.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = home.logs / f"{stem}.log"
    if path.exists():  # a second command of the same name in the same second
        path = home.logs / f"{stem}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_RunFormatter("%(asctime)s %(levelname)s %(where)s [%(threadName)s]: %(message)s"))
    log = RunLog(path)
    # Python warnings to the "py.warnings" logger, hence the file. Not logging.captureWarnings: it does nothing when a
    # library (or an earlier catch_warnings block that restored showwarning under it) left it "on" already.
    shown_before = warnings.showwarning
    warnings.showwarning = _warning_to_log
    _open.append(log)
    try:
        with _root_handler(handler, logging.INFO):
            adopt_library_loggers()
            try:
                yield log
            except BaseException:  # the traceback reaches the console anyway; the log file keeps it too
                logging.getLogger(__name__).exception("The command failed", extra={"console": False})
                raise
    finally:
        _open.remove(log)
        warnings.showwarning = shown_before
        handler.close()


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` while a run log is open: the warning as a "py.warnings" record, as logging's own."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    if file is not None:  # an explicit destination is honoured
        file.write(text)
        return
    logging.getLogger("py.warnings").warning("%s", text.rstrip())


def adopt_library_loggers() -> None:
    """While a run log is open, send SELF_HANDLED loggers' records (Ray's driver messages) through it; call after
    importing such a library."""
    if not _open:
        return
    for name in SELF_HANDLED:
        logger = logging.getLogger(name)
        if logger.handlers:
            logger.handlers.clear()
            logger.propagate = True


def note_ray_session(session_dir: Path) -> Path:
    """Record Ray's session logs in the open run log, with a symlink `<log file stem>-ray` next to the log file
    (the session folder may live under /tmp, see medplib.train.launcher._short_tmp); returns the logs folder."""
    logs = Path(session_dir) / "logs"
    if _open:
        run = _open[-1]
        run.ray_logs = logs
        link = run.file.with_name(run.file.stem + "-ray")
        if not link.is_symlink():
            link.symlink_to(logs, target_is_directory=True)
    return logs


@contextmanager
def _root_handler(handler: logging.Handler, level: int) -> Iterator[None]:
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    root.setLevel(min(level, before) if before else level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(before)
