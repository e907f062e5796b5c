"""Identity by API key: a caller is the HMAC of the bearer key it sends, never the key itself.

For routes whose clients carry their own provider key (`Authorization: Bearer sk-...`, the
OpenAI SDK's way): the key is the credential, so no trusted gateway is needed, and a caller can
only ever reach the entries made under its own key. The user is
`_key-` + the first 32 hex digits of HMAC-SHA256(`identity.api_key_secret`, key). The key itself
is forwarded upstream as the client sent it, and is never stored, logged or kept in memory
beyond the request.

Why an HMAC and not a plain sha256: an API key has far too much entropy to be guessed from
either, but a plain hash is the same everywhere, so anyone holding a key (or a list of leaked
keys) could find its folder in the Volume, the index or the dashboard, and anyone reading those
could confirm which keys used this proxy. With a per-deployment secret the names are useless
outside the deployment, and rotating the secret orphans (and so, through the budgets, expires)
every key's entries at once.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from typing import Final

from proxy.reasons import Reason
from proxy.speak import API_KEY_USER_PREFIX

# RFC 6750 2.1: "Bearer" (any case), one or more spaces, a b64token.
_BEARER: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *")
USER_HEX_DIGITS: Final = 32


class ApiKeyUsers:
    """Turns the `Authorization` header of a request into the user its key stands for."""

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def user_of(self, authorization: Sequence[str]) -> str | Reason:
        """The user of the one bearer key in `authorization` (the header's values), or why none."""
        if not self._secret:
            return Reason.IDENTITY_OFF  # config refuses an api-key route without a secret
        if not authorization:
            return Reason.NO_IDENTITY
        if len(authorization) > 1:
            return Reason.AMBIGUOUS_IDENTITY
        found = _BEARER.fullmatch(authorization[0])
        if found is None:
            return Reason.NO_IDENTITY
        return key_user(self._secret, found.group(1))


def key_user(secret: bytes, key: str) -> str:
    """The user an API key stands for under `secret`."""
    mac = hmac.digest(secret, key.encode(), "sha256").hex()
    return API_KEY_USER_PREFIX + mac[:USER_HEX_DIGITS]
