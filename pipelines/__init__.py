"""pipelines: stage one (build), stage two (train), evaluation and the `richkd-cache` CLI."""
