"""Dashboard sessions: signed, expiring, revocable cookies and CSRF tokens bound to them."""

from __future__ import annotations

import pytest

from proxy.admin.session import SessionSigner

TOKEN = "s3cret-admin-token"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_an_issued_cookie_reads_back_as_its_session_and_never_carries_the_token() -> None:
    signer = SessionSigner(TOKEN)
    cookie, session = signer.issue()
    assert signer.read(cookie) == session
    assert TOKEN not in cookie
    assert signer.csrf_valid(session, session.csrf)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),  # signature
        lambda c: "9" + c,  # expiry pushed out
        lambda c: c.replace(".", "x", 1),  # shape
        lambda c: c + "é",  # not ASCII
        lambda c: "",
    ],
)
def test_a_tampered_cookie_is_no_session(tamper: object) -> None:
    signer = SessionSigner(TOKEN)
    cookie, _ = signer.issue()
    assert callable(tamper)
    assert signer.read(tamper(cookie)) is None


def test_another_token_does_not_accept_the_cookie_but_another_process_with_it_does() -> None:
    cookie, _ = SessionSigner(TOKEN).issue()
    assert SessionSigner("another-token").read(cookie) is None
    # Workers and replicas share admin.token, so they share sessions.
    assert SessionSigner(TOKEN).read(cookie) is not None


def test_a_session_expires_and_a_revoked_one_is_refused() -> None:
    clock = Clock()
    signer = SessionSigner(TOKEN, lifetime_seconds=60, clock=clock)
    cookie, session = signer.issue()
    other_cookie, _ = signer.issue()
    signer.revoke(session)
    assert signer.read(cookie) is None
    assert signer.read(other_cookie) is not None
    clock.now += 61
    assert signer.read(other_cookie) is None


def test_csrf_tokens_belong_to_one_session() -> None:
    signer = SessionSigner(TOKEN)
    _, first = signer.issue()
    _, second = signer.issue()
    assert first.csrf != second.csrf
    assert not signer.csrf_valid(first, second.csrf)
    assert not signer.csrf_valid(first, None)
    assert not signer.csrf_valid(first, "")


def test_sessions_need_a_token() -> None:
    with pytest.raises(ValueError):
        SessionSigner("")
