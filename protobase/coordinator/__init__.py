"""The coordinator process: commit serialisation and the only writer of shared memory.

`server.py` runs it, `writer.py` applies commits by path copying,
`conflicts.py` validates them, `launcher.py` starts one for a client that
finds none running.
"""
