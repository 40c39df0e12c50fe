"""Code that runs in a client process: the session with a coordinator, snapshots, transactions.

A client maps the segments read-only, reads snapshots without a round trip,
and sends commits to the coordinator over its socket. `session` is a handle's
attachment (connection, reader slot and pins, store, commits) over
`connection` (the socket's request/reply stream); `snapshot` and
`transaction` are what a user holds, the transaction recording into its
`writeset` through the wrappers of `txvalues`, `tracked` and `local`;
`pool`, `watch`, `stats` and `check` serve the façade's verbs. The
`launcher` starts a coordinator for a client that finds none running; it
never imports the coordinator, it runs `python -m protobase.coordinator`.
"""
