"""The data model every process shares: values, their encoding, atoms in segments, trees, views.

Imported by clients, the coordinator and the persistence process alike; it
runs wherever it is called and holds no process-wide state but caches.
Bottom-up: `frozen` (read-only values), `codec` (values as msgpack),
`arena` (atoms in data segments), `btree/` (persistent B+trees of atoms: node
format, reading, writing, checking), `index` (secondary index entries),
`cache` and `store` (reading atoms through caches), `views` (the read-only
collections a snapshot hands out), `datadir` (the data directory on disk).
Only the coordinator writes atoms; everything here reads them from segments
mapped read-only elsewhere.
"""
