"""The benchmark: mock upstream, bare relay and gateway on loopback, driven by one generator.

``python -m loadtest.bench`` (see :mod:`loadtest.bench.cli`). Talks to the gateway only
over HTTP and starts it as a subprocess; must not import ``proxy``, ``workers`` or
``store``.
"""
