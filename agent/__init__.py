"""The device agent: sync, download, verify, stage, serve, shadow, measure, report."""
