"""Code that runs in a client process: the connection to a coordinator, snapshots, transactions.

A client maps the segments read-only, reads snapshots without a round trip,
and sends commits to the coordinator over its socket (`connection`). The
`launcher` starts a coordinator for a client that finds none running; it
never imports the coordinator, it runs `python -m protobase.coordinator`.
"""
