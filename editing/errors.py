"""The root of factkeeper's typed exceptions: the CLI turns each into a message and exit 2."""


class FactkeeperError(Exception):
    """An expected failure with a message meant for the person running factkeeper."""


class EditError(FactkeeperError):
    """An edit could not be computed or applied; the model is unchanged.

    Defined here, not beside the editors, so that modules which import no torch (the registry,
    the safeguards' config) can raise it.
    """
