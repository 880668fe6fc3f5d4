"""The ``convoy`` CLI and job control: scan, shard, submit, wait, status, and the local cluster."""
