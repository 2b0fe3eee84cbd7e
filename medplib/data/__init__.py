"""Data: record schema, synthetic generator, source readers, ingest, expectations, torch dataset."""
