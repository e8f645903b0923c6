"""One clear line, never a traceback, when a command's chain cannot be reached or refuses."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

from daisee_node.errors import DaiseeError


def chain_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a chain that cannot be reached or refuses into one clear line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        import requests
        from web3.exceptions import Web3Exception

        try:
            return fn(args)
        except requests.RequestException as exc:
            url = exc.request.url if exc.request is not None else None
            where = f" at {str(url).rstrip('/')}" if url else ""
            raise DaiseeError(f"cannot reach the chain{where}: {exc.__class__.__name__}") from None
        except Web3Exception as exc:
            raise DaiseeError(f"the chain refused: {exc}") from None

    return wrapper
