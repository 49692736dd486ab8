"""Is the Hugging Face hub reachable? Asked once, before any slow retrying download starts.

Without this check an offline machine waits through transformers' and datasets' retry back-off
(about 30 s per file here) before failing with a network traceback.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def hub_offline_by_env() -> bool:
    return any(
        os.environ.get(var, "").lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@functools.lru_cache(maxsize=4)
def _endpoint_reachable(endpoint: str, timeout: float) -> bool:
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_available(offline: bool = False, timeout: float = 3.0) -> bool:
    """True when downloads from the hub can be attempted.

    Args:
        offline: the run's ``offline`` setting; True never contacts the hub.
        timeout: seconds to wait for a TCP connection to the hub endpoint.
    """
    if offline or hub_offline_by_env():
        return False
    return _endpoint_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)
