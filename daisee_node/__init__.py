"""daisee-node: the edge daemon of one node of a citizen-run microgrid."""

__version__ = "0.1.0"

from daisee_node.errors import DaiseeError

__all__ = ["DaiseeError", "__version__"]
