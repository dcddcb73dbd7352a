"""What a run needs around the stages: the run dir and manifest, live progress, tables and reports."""
