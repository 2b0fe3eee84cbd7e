"""Evaluation as MedPLIB does it: per-sample metrics (`medplib.eval.metrics`), aggregated per modality."""
