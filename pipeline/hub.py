"""The Hugging Face Hub, asked once and quickly, before anything is loaded or trained.

Why: ``from_pretrained`` and ``HfApi`` retry a Hub they cannot reach with backoff, minutes of
"Retrying in Ns" lines per file, before the error that says the network is down. One request here,
with a short timeout and no retries, tells "unreachable", "no such model" and "bad token" apart in
seconds, so the caller can fail at once with the way out, or load from the cache offline.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

PROBE_TIMEOUT = 5.0  # seconds; the Hub answers in well under one when it is reachable


class HubError(RuntimeError):
    """The Hub cannot serve what was asked; the message says why in one line."""


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def get(path: str, token: str | None = None) -> tuple[int, dict]:
    """``(HTTP status, JSON body or {})`` of one GET on the Hub; ``HubError`` when it cannot be reached."""
    request = urllib.request.Request(f"{endpoint()}{path}", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as response:  # noqa: S310 (the Hub's URL)
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, {}
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise HubError(f"the Hugging Face Hub ({endpoint()}) cannot be reached ({reason})") from None


def cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s ``config.json`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model(repo_id: str) -> None:
    """``HubError`` unless the Hub holds ``repo_id`` and this token may read it."""
    from huggingface_hub import get_token

    status, _ = get(f"/api/models/{repo_id}", get_token())
    if status in (401, 403, 404):
        raise HubError(f"the Hugging Face Hub has no model '{repo_id}' this token may read (HTTP {status}): "
                       f"check the id, or log in with `hf auth login` for a private or gated model")
    if status >= 400:
        raise HubError(f"the Hugging Face Hub answered HTTP {status} for '{repo_id}'")


def check_push(repo_id: str | None) -> None:
    """``HubError`` naming the problem unless ``repo_id`` is a valid id, a token is set, and the Hub
    accepts that token: what an upload at the end of training needs."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, or set "
                       "trainer_config.push_to_hub=false")
    try:
        validate_repo_id(repo_id or "")
    except HFValidationError:
        repo_id = None
    if not repo_id or "/" not in repo_id:
        raise HubError("trainer_config.hub_model_id must be 'user-or-org/name' to push to the Hub")
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token to push with: run `hf auth login` or set HF_TOKEN "
                       "(or set trainer_config.push_to_hub=false)")
    status, _ = get("/api/whoami-v2", token)
    if status in (401, 403):
        raise HubError(f"the Hugging Face Hub refuses this token (HTTP {status}): run `hf auth login` again "
                       f"or set another HF_TOKEN")
    if status >= 400:
        raise HubError(f"the Hugging Face Hub answered HTTP {status} when checking the token")
