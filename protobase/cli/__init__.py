"""The `protobase` command line: serve, status, stats, check, dump, load, backup, recover, bench, demo.

Runs in the user's shell process; `serve` becomes a coordinator in place.
"""
