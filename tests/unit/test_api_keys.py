"""Identity by API key (proxy/api_keys.py): the HMAC of the bearer key, never the key."""

from __future__ import annotations

import hashlib
import hmac

from proxy.api_keys import ApiKeyUsers
from proxy.reasons import Reason
from proxy.speak import api_key_user, valid_id, valid_user_segment

SECRET = "a-per-deployment-secret-of-32-characters"


def test_a_bearer_key_is_its_hmac_under_the_deployments_secret() -> None:
    user = ApiKeyUsers(SECRET).user_of(["Bearer sk-proj-abc123"])
    expected = hmac.new(SECRET.encode(), b"sk-proj-abc123", hashlib.sha256).hexdigest()[:32]
    assert user == f"_key-{expected}"
    assert isinstance(user, str) and "abc123" not in user
    # The same key is another user under another deployment's secret, and another key another.
    assert (
        ApiKeyUsers("another-secret-of-at-least-32-chars").user_of(["Bearer sk-proj-abc123"])
        != user
    )
    assert ApiKeyUsers(SECRET).user_of(["bearer  sk-proj-abc124"]) != user
    # Its own namespace: never a valid id a gateway could name, always a user folder.
    assert api_key_user(user) and valid_user_segment(user) and not valid_id(user)


def test_what_names_no_key() -> None:
    users = ApiKeyUsers(SECRET)
    assert users.user_of([]) is Reason.NO_IDENTITY
    assert users.user_of(["Basic YWxpY2U6cHc="]) is Reason.NO_IDENTITY
    assert users.user_of(["Bearer"]) is Reason.NO_IDENTITY
    assert users.user_of(["Bearer a b"]) is Reason.NO_IDENTITY
    assert users.user_of(["Bearer sk-a", "Bearer sk-b"]) is Reason.AMBIGUOUS_IDENTITY
    assert ApiKeyUsers("").user_of(["Bearer sk-a"]) is Reason.IDENTITY_OFF
