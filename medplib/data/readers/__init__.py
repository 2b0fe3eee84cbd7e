"""Source readers: each turns a source folder into MeCoVQA-layout items for ingest."""
