"""The console: one progress display per step (a bar on a terminal, a line every 10 s elsewhere) and the split of
messages between the console and the command's log file."""
from __future__ import annotations

import io
import logging
import warnings

import pytest

from medplib.config import resolve_home
from medplib.progress import StepProgress, progress_line, track, training_detail
from medplib.run_log import ConsoleFilter, console_logging, note_ray_session, run_log

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "medplib.progress"]


def test_without_a_terminal_a_line_at_most_every_10_s_and_one_at_the_end(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="medplib.progress")
    clock, stream = FakeClock(), io.StringIO()
    times = []
    with StepProgress("evaluate", 40, "samples", stream=stream, now=clock) as progress:
        for _ in range(35):
            clock.t += 1.0
            progress.update()
            if len(_lines(caplog)) > len(times):
                times.append(clock.t - 1000.0)
    assert times == [10.0, 20.0, 30.0]
    lines = [r.getMessage() for r in _lines(caplog)]
    assert len(lines) == 4 and lines[0] == "evaluate: samples 10/40 (25%), 1.0 samples/s, elapsed 0:10, ETA 0:30"
    assert lines[-1].startswith("evaluate: samples 35/40 (88%)")
    assert all(getattr(r, "console", True) for r in _lines(caplog))  # no bar: the console shows the lines
    assert stream.getvalue() == ""  # no tqdm bar, so no carriage returns in a redirected log


def test_a_training_job_reports_its_own_pace(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="medplib.progress")
    clock = FakeClock()
    progress = StepProgress("stage 1 (align)", 0, "step", stream=io.StringIO(), now=clock)
    clock.t += 12
    args = dict(step=50, total=200, first_step=40, loss=0.5, samples_per_s=8.0, elapsed=20.0)
    progress.set(50, 200, training_detail(**args))
    progress.close()  # the line at 12 s already showed step 50: no second one
    progress.close()
    lines = [r.getMessage() for r in _lines(caplog)]
    assert lines == [progress_line("stage 1 (align)", **args)]
    assert lines[0] == "stage 1 (align): step 50/200 (25%), loss 0.5000, 8.0 samples/s, elapsed 0:20, ETA 5:00"


def test_on_a_terminal_a_bar_and_the_lines_only_in_the_log_file(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="medplib.progress")
    clock, stream = FakeClock(), Terminal()
    for _ in track(range(30), "synth", "images"):
        clock.t += 1.0
    with StepProgress("synth", 30, "images", stream=stream, now=clock) as progress:
        for _ in range(30):
            clock.t += 1.0
            progress.update()
    assert "\r" in stream.getvalue() and "30/30" in stream.getvalue()
    marked = _lines(caplog)[-3:]  # lines at 10, 20 and 30 s; the one at 30 s is also where it ended
    assert [r.getMessage().split(",")[0] for r in marked] == [f"synth: images {n}/30 (" + f"{100 * n / 30:.0f}%)"
                                                              for n in (10, 20, 30)]
    assert _lines(caplog)[0].getMessage().startswith("synth: images 30/30 (100%)")  # track(): at close only
    assert not any(ConsoleFilter().filter(r) for r in marked)


def test_disabled_progress_says_nothing(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="medplib.progress")
    assert list(track(range(3), "synth", "images", disable=True)) == [0, 1, 2]
    assert _lines(caplog) == []


def test_console_gets_medplib_and_warnings_the_log_file_gets_everything(tmp_path):
    home = resolve_home(tmp_path / "home").ensure()
    console = io.StringIO()
    with console_logging(console), run_log(home, "data ingest") as log:
        logging.getLogger("medplib.data").info("ingested 48 records")
        logging.getLogger("prefect.task_runs").info("Finished in state Completed()")
        logging.getLogger("ray.train").info("PlacementGroupCleaner: State API may be temporarily unavailable")
        logging.getLogger("mlflow.store").warning("a library warning")
        warnings.warn("per-step deprecation", FutureWarning)
        logging.getLogger("medplib.progress").info("a line the bar shows", extra={"console": False})
        ray_logs = note_ray_session(tmp_path / "session_x")
    shown = console.getvalue()
    assert "ingested 48 records" in shown and "Finished in state" in shown and "a library warning" in shown
    assert "PlacementGroupCleaner" not in shown and "per-step deprecation" not in shown
    assert "a line the bar shows" not in shown
    assert log.file.parent == home.logs and log.file.name.startswith("data-ingest-")
    kept = log.file.read_text()
    for text in ("ingested 48 records", "PlacementGroupCleaner", "per-step deprecation", "a library warning",
                 "a line the bar shows"):
        assert text in kept
    assert log.ray_logs == ray_logs == tmp_path / "session_x" / "logs"
    assert (home.logs / f"{log.file.stem}-ray").readlink() == ray_logs
    assert f"Full log: {log.file}; Ray worker logs in {ray_logs}" == log.text()
    # both handlers are gone again: a later message reaches neither
    logging.getLogger("medplib.data").warning("after the command")
    assert "after the command" not in console.getvalue() + log.file.read_text()


def test_the_driver_shows_what_rank_0_publishes_and_ignores_an_earlier_runs_file(
        tmp_path, caplog: pytest.LogCaptureFixture):
    from medplib.train.launcher import show_progress
    from medplib.train.worker import publish_progress

    caplog.set_level(logging.INFO, logger="medplib.progress")
    out = tmp_path / "stage1"
    publish_progress(out, step=3, total=9, first_step=0, loss=1.0, samples_per_s=1.0, elapsed=1.0)
    with show_progress(out, "stage 1 (align)", poll_s=0.01):
        pass  # the job failed before its first step: the earlier run's step 3 is not shown
    assert _lines(caplog) == []
    with show_progress(out, "stage 1 (align)", poll_s=0.01):
        publish_progress(out, step=9, total=9, first_step=0, loss=0.25, samples_per_s=4.0, elapsed=18.0)
    assert [r.getMessage() for r in _lines(caplog)] == [progress_line("stage 1 (align)", 9, 9, 0, 0.25, 4.0, 18.0)]
    assert list(out.iterdir()) == []  # the progress file is not left in the saved model's folder
