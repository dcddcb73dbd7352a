"""Machine facts: the Hardware record, the probe (one module per GPU vendor), saved profiles, the software stack."""
