"""The `protobase` command line: serve, status, stats, check, dump, load, backup, recover, bench, demo.

Runs in the user's shell process; `serve` becomes a coordinator in place.
`main` parses and dispatches (the `protobase` script is `protobase.cli.main:main`);
each command is in its own module (see main.py's docstring).
"""
