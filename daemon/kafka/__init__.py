"""The daemon's Kafka clients: consumers and producers built from the settings, and producing.

``clients`` builds kafka-python clients (auto-commit off, idempotent producer) and checks a TLS
or SASL connection stage by stage first; ``produce`` sends fact corrections to the topic (JSONL
files or dataset records), for demos, tests and benchmarks. The local development broker is
``daemon.devtools.kafka_broker``, outside the daemon's runtime path.
"""
