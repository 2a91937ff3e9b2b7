"""Development tools, not part of the running daemon: only the CLI's ``kafka`` and ``demo``
commands import this package (``tests/test_dependencies.py``), never the daemon's runtime path.

``kafka_broker`` starts a real single-node Kafka broker on loopback from the jars
``deploy/kafka/pom.xml`` resolves, for ``factkeeper kafka``, ``factkeeper demo``, the benchmarks
and the integration tests (it needs the checkout's ``deploy/kafka/``, so it works from an
editable install).
"""
