"""Ray's token authentication, for a driver joining a cluster by address.

Ray 2.59+ turns token authentication on for a cluster started with ``ray start --head`` when a token exists
(``ray get-auth-token --generate``, or the one an earlier local ``ray.init()`` wrote to ``~/.ray/auth_token``), but a
driver that joins by explicit address does not look for one. Ray reads ``RAY_AUTH_MODE`` when it is imported, so
this module (which imports no Ray) sets it first.
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_TIMEOUT_S = 60.0  # how long a driver waits for the cluster at --ray-address (a head still starting included)

AUTH_HELP = (
    "A cluster with token authentication needs its token on this machine: copy the head's ~/.ray/auth_token to "
    "~/.ray/auth_token here, or set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH to a file holding it); "
    "RAY_AUTH_MODE=token is then set for you (set RAY_AUTH_MODE=disabled for a cluster without tokens)"
)


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def use_token_if_present() -> bool:
    """Set ``RAY_AUTH_MODE=token`` (unless it is set) when a token is at one of Ray's standard places: the
    ``RAY_AUTH_TOKEN`` variable, the file ``RAY_AUTH_TOKEN_PATH`` names, ``~/.ray/auth_token``. Call before
    importing Ray. Returns whether token mode is on."""
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_path().is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
