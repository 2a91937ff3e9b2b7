"""Development tools, not part of the running daemon: the daemon never imports this package.

``kafka_broker`` starts a real single-node Kafka broker on loopback from the jars
``deploy/kafka/pom.xml`` resolves, for ``factkeeper kafka``, ``factkeeper demo``, the benchmarks
and the integration tests (it needs the checkout's ``deploy/kafka/``, so it works from an
editable install).
"""
