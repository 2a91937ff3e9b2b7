"""The ``none`` method: the unedited model, the floor every editor is compared against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editing.editors.base import Editor
from editing.models import LoadedModel
from editing.requests import EditRequest


class NoEdit(Editor):
    """Changes nothing: every request "applies" with no deltas."""

    name = "none"
    supports_batch = True

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        return {}
