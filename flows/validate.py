"""The validate step: the Great Expectations gate over `data/`; a failed expectation stops the pipeline."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NONE

from medplib.config import RunContext
from medplib.data.expectations import validate_dataset


class DataValidationError(RuntimeError):
    """The dataset failed the gate; the message lists each failed expectation with examples."""


@task(name="validate", cache_policy=NONE)
def validate_data(ctx: RunContext) -> dict:
    """Run the suites; raise DataValidationError (no retry can fix bad data) when any expectation fails."""
    if not (ctx.data_dir / "records.jsonl").exists():
        raise FileNotFoundError(f"No dataset at {ctx.data_dir}: run the ingest step first")
    report = validate_dataset(ctx.data_dir, ctx.home.reports / "data_docs")
    create_link_artifact(link=report.data_docs.as_uri(), link_text="Great Expectations Data Docs",
                         key="data-docs", description=report.summary().splitlines()[0])
    if not report.success:
        raise DataValidationError(report.summary())
    get_run_logger().info(report.summary())
    return {k: v for k, v in report.to_dict().items() if k != "results"}


@flow(name="validate")
def validate_flow(preset: str = "tiny", config: Path | None = None, home: Path | None = None,
                  project: Path | None = None, profile: str = "local", context: RunContext | None = None) -> dict:
    """The gate over `<project>/data`: counts and the Data Docs path, or DataValidationError. A `context` (the
    pipeline's) is used as given; without one, it is resolved here from the other parameters."""
    return validate_data(context or RunContext.resolve(preset, config, home, project, profile))
