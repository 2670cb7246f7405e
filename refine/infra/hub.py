"""Loading from the Hugging Face hub or a local directory: the one message for a model that will not load."""

from __future__ import annotations

import os


def load_failure(what: str, name: str, error: Exception, setting: str) -> OSError:
    """One line naming the model, the setting it came from, and what to pass instead. Offline
    (``HF_HUB_OFFLINE``) a hub id loads only from the local cache, which is the usual cause."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline and not os.path.isdir(name):
        why = "it is not a local directory, and offline (HF_HUB_OFFLINE=1) a hub id loads only from the local cache"
    else:
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return OSError(f"could not load the {what} {name!r} ({setting}): {why}; pass a local directory saved with "
                   "save_pretrained, or a hub id on a machine with internet")
