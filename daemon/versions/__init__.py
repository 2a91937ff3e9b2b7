"""Model versions: snapshots of the edited weights, registered in MLflow and restored from there.

``snapshots`` writes and reads the edited tensors with their metadata, ``registry`` keeps them as
MLflow model versions with the ``candidate`` and ``production`` aliases, and ``keeper`` is the
daemon's ``VersionKeeper``: snapshot now, restore the newest version the journal agrees with.
"""
