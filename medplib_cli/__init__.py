"""The `medplib` command line. It sits above both the library (`medplib`) and the Prefect flows (`flows`): it runs
flows, and `medplib` never imports `flows`."""
