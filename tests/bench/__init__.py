"""The authsvc benchmark: ``.venv/bin/python -m tests.bench [--json PATH]``.

One command starts the test suite's PostgreSQL and Redis (the fixtures of
``tests/infra.py``, run through pytest by ``infra_holder.py``), migrates,
starts the server in its own process (``server.py``: ``build_server`` plus a
bare ``/bench.Echo/Echo`` RPC behind the same interceptor), and drives it from
a separate load-generator process (``loadgen.py``). ``run.py`` orchestrates,
prints the table and the ratios, and stops every process it started.

Modules:

``run``           the orchestrator (``__main__`` calls it)
``infra_holder``  a pytest "test" that holds PostgreSQL and Redis until released
``server``        the authsvc server process
``loadgen``       the load generator process
``common``        names shared by those processes
``collapsed``     summarises a ``py-spy record --format raw`` profile (``--py-spy``)

``python -m tests.bench sidecar`` is a second benchmark: the cost of the sidecar
interceptor on the notes example (``clients/examples/notes``), GetNote with and
without it in one run:

``sidecar``          its orchestrator
``notes_server``     the notes server process (a protected and a plain server)
``sidecar_loadgen``  its load generator process

``python -m tests.bench revocation`` is a third: how long a signed-out session's
token is still accepted by a sidecar in watch mode (SignOut returned -> first
refusal; median, p90, max), on the embedded default and across two replicas on
PostgreSQL and Redis (``revocation``; its servers are ``server`` processes).
"""
