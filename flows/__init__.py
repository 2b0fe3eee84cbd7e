"""Prefect flows over medplib, one per step (ingest, validate, train, evaluate) and `pipeline`, which calls them.

Flows stay thin: they resolve parameters, call `medplib`, and add what an orchestrator is for (caching, retries,
artifacts, schedules). `medplib` never imports this package; only the CLI reaches it, lazily.
"""
