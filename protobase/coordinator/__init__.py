"""The coordinator process: commit serialisation and the only writer of shared memory.

Runs as `python -m protobase.coordinator DIR` (started by a client's launcher
or by `protobase serve`). `server` runs the loop and answers requests,
`writer` applies commits by path copying, `conflicts` validates them,
`recovery` rebuilds the segments from checkpoint and WAL at start-up,
`durability` supervises the persistence process. No client code imports it.
"""
