"""What crosses the coordinator's socket: framing, request verbs, operation codes, the error table.

Both sides import it: the client to build requests and read replies, the
coordinator to parse requests and answer them. Everything arriving here from
the socket is untrusted data, checked before it is used.
"""
