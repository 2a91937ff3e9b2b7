"""The ingest path: Kafka records in, validated events, edits applied and post-checked.

``payloads`` decodes untrusted JSON within bounds, ``events`` validates fact corrections,
``applier`` turns them into model edits (with the retry ladder), ``restores`` tells the ones that
put a fact's original answer back (no edit), and ``consumer`` runs the loop that journals every
record and commits offsets only after the journal is durable.
"""
