"""Fail fast, and say what to do, when pretrained weights must come from an unreachable Hub.

Offline, timm and transformers retry each download for about a minute before failing, and
only timm's error hints at random weights. Before a pretrained load we resolve the Hub's host
name once: when that fails, the libraries are switched to their offline mode for the load, so
weights already in the local cache still load and anything else fails at once; the error then
names ``pretrained=0`` and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator
from urllib.parse import urlparse

from usae.errors import UsaeError


def hub_reachable() -> bool:
    """False when offline mode is set or the Hub's host name does not resolve."""
    if any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE",
                                                               "TRANSFORMERS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host or "huggingface.co", 443)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable(what: str) -> Iterator[bool]:
    """Run a pretrained load in offline mode when the Hub is unreachable; turn the failure
    into one line that says what to do. Yields whether the Hub is reachable."""
    reachable = hub_reachable()
    patched = None
    if not reachable:
        try:
            import huggingface_hub.constants as hub_constants

            patched = hub_constants.HF_HUB_OFFLINE
            hub_constants.HF_HUB_OFFLINE = True
        except ImportError:
            pass
    try:
        yield reachable
    except (UsaeError, RuntimeError, TypeError, KeyError):
        raise  # not about the network: an unknown model, a bad option
    except Exception as err:  # noqa: BLE001 - the hub clients raise many types
        if reachable:
            raise
        raise UsaeError(f"cannot load pretrained {what}: the Hugging Face Hub cannot be reached "
                        "and the weights are not in the local cache — add pretrained=0 to the "
                        "spec for random weights, or download them once with network "
                        f"({type(err).__name__})") from None
    finally:
        if patched is not None:
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = patched
