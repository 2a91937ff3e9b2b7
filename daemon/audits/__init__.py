"""Audits at run time: when one is due, and running it between batches.

``schedule`` raises a flag every N applied edits, every T minutes or on request; ``runner``
snapshots the weights, audits them (``monitoring.auditor``), gates the figures
(``monitoring.gates``) and promotes the version or quarantines the edits and rolls back.
"""
