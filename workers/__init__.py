"""Example relaybus workers: `--handlers workers.examples`."""
