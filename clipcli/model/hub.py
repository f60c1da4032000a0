"""Where a ``--model`` lives: a local directory, or a hub id (and whether the hub is reachable).

Two first-hour frictions are settled here, before transformers is asked anything:
- a path-looking model that does not exist is a missing directory (transformers would call it
  an invalid repo id);
- with no network, the hub's metadata calls fail only after retries (~30 s here). A 3 s TCP
  connect to the hub (or the HTTPS proxy) first: when it fails, this process switches to
  offline mode, so a cached model loads at once and an uncached one fails at once, with a
  message that says what to do.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from clipcli.errors import ModelError

PROBE_TIMEOUT_S = 3.0
NO_NETWORK_HINT = (
    "no network connection to the model hub ({endpoint}) and the model is not in the local cache "
    "(HF_HOME); use a local checkpoint directory (--model ./my-checkpoint), or download it once "
    "while online"
)


def looks_like_path(model: str) -> bool:
    """Whether ``model`` can only be a path: hub ids are ``name`` or ``owner/name``."""
    return model.startswith(("/", "./", "../", "~", ".\\", "..\\")) or model in (".", "..") or model.count("/") > 1


def check_local(model: str) -> None:
    """ModelError for a path-looking model that is not an existing directory."""
    path = Path(model).expanduser()
    if path.is_dir() or not looks_like_path(model):
        return
    reason = "is not a directory" if path.exists() else "no such directory"
    raise ModelError(f"cannot load model {model!r}: {reason} (a local checkpoint is a directory with config.json)")


def offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.cache
def hub_reachable() -> bool:
    """One short TCP connect to the hub (or to the HTTPS proxy, where one is set)."""
    parts = urlsplit(endpoint())
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") if parts.scheme == "https" else (
        os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy"))
    target = urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else parts
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Offline mode for this process and its children (Ray workers, a detached server)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except Exception:
        pass


def prepare(model: str) -> bool:
    """Check ``model`` before loading; True when this call switched the process offline."""
    check_local(model)
    if Path(model).expanduser().is_dir() or offline() or hub_reachable():
        return False
    go_offline()
    return True
