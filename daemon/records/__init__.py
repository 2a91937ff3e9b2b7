"""What the daemon has done, durably: the journal, each unit's stored deltas, and history moves.

``journal`` is the source of truth (every consumed record and control command, with its
outcome), ``live_set`` says which correction of each fact is live (the journal links the rest as
superseded), ``unit_deltas`` keeps each journaled unit's weight change beside it so replay need
not re-edit, and ``history`` rolls the model back to a version or reverts edits through them.
"""
