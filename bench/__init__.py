"""Benchmark harness for the blog.v1 service: `python -m bench --quick | --full`.

Modules:
    cli          command line, the run from seeding to report
    scenarios    every scenario and ceiling, run against the seeded database
    seed         create, migrate, COPY-seed, ANALYZE and drop the bench database
    client       load-generating client processes (grpc.aio, closed and open loop)
    metrics      CPU and RSS of process trees, PostgreSQL backends, percentiles
    procs        subprocesses: start, wait for health SERVING, kill on exit
    dbceil       database ceilings run as a subprocess (asyncpg, SQLAlchemy, COPY)
    ceiling_server  bare grpc.aio echo and asyncpg->batched-gRPC stream servers
    naive_server the tutorial-style twin (generated servicer + session.get)
    serve_workers  `serve --workers N` through the service's CLI imported as a module
                 (a fallback, used and reported only if `python -m service serve
                 --workers 2` itself fails to start)
    profile      py-spy record --format raw, summarised
    report       results table, targets, docs/BENCHMARKS.md
"""
