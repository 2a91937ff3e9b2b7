"""The root of factkeeper's typed exceptions: the CLI turns each into a message and exit 2."""


class FactkeeperError(Exception):
    """An expected failure with a message meant for the person running factkeeper."""
