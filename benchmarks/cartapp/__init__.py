"""The cart web app of `python -m benchmarks.cart`: one WSGI app over ProtoBase, SQLite WAL and Redis.

`stores.py` holds the three backends (the same two operations on each),
`app.py` the WSGI entry point that gunicorn workers serve, `cart.lua` the
request mix that `wrk` sends. Runs in gunicorn worker processes (the app) and
in the benchmark's process (`prepare`, which loads the carts before gunicorn
starts).
"""
