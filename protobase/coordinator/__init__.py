"""The coordinator process: commit serialisation and the only writer of shared memory.

Runs as `python -m protobase.coordinator DIR` (started by a client's launcher
or by `protobase serve`). `server` runs the event loop and dispatches
requests; `clients` keeps the connections; `commits` validates (`conflicts`),
applies (`writer`) and publishes commits; `checkpoints` asks the persistence
process for checkpoints and backups; `reclamation` compacts and unlinks
retired segments; `durability` supervises the persistence process;
`recovery` rebuilds the segments from checkpoint and WAL at start-up. No
client code imports it.
"""
