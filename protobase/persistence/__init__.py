"""The persistence process and the files it owns: the write-ahead log and checkpoints.

Runs in its own process (`python -m protobase.persistence`), started by the
coordinator: `process` drains the commit ring into the WAL and writes
checkpoints; `wal` and `checkpoint` own the two file formats, read back by the
coordinator's recovery and by `protobase recover`. Nothing here touches the
data segments: the persistence process only reads the ring and writes files.
"""
