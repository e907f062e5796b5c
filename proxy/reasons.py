"""Why a speak call was not cached: the fixed vocabulary of `Cache-Status: ...; detail=`."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """One reason a speak call was forwarded without the cache (`X-TTS-Cache: disabled`).

    Each value is an RFC 9211 `detail` token (RFC 8941 sf-token: a letter, then letters, digits
    and `-`), sent in `Cache-Status` and written to the access log's `reason`. The list is closed:
    a client or a dashboard may match on it. They are listed in the order they are judged: the
    first that applies is the one given.
    """

    IDENTITY_OFF = "identity-off"
    """`identity.mode = "none"` (for this route): nobody is identified, nothing is cached."""
    UNTRUSTED_PEER = "untrusted-peer"
    """The TCP peer is not in `identity.trusted_proxies`: its identity headers are not believed."""
    NO_IDENTITY = "no-identity"
    """A trusted peer named no user (or the caller sent no bearer API key)."""
    AMBIGUOUS_IDENTITY = "ambiguous-identity"
    """The user, token or API key header came twice, or as a list: no one is believed."""
    NOT_JSON = "not-json"
    """The body is not a JSON object (or is nested too deeply to parse)."""
    SAVE_OFF = "save-off"
    """The body's save field (`save_to_volume`) is present and not `true`."""
    SAVE_DEFAULT_OFF = "save-default-off"
    """The body says nothing about saving and the route's default (`tts.save_by_default`) is off."""
    UNDECLARED_FIELD = "undeclared-field"
    """The body has a field the route's contract does not declare: it might change the audio."""
    INVALID_FIELD = "invalid-field"
    """A field the key needs is missing or of a type the contract cannot key on."""
    NO_TEXT = "no-text"
    """The text is absent, not a string, or blank."""
    TEXT_TOO_LONG = "text-too-long"
    """The text is longer than `cache.max_text_chars`."""
    INVALID_ID = "invalid-id"
    """The user, a message or thread id or the voice is not a safe path segment."""
    OWNERSHIP_UNCONFIRMED = "ownership-unconfirmed"
    """`index.verify_ownership`: the index did not confirm (or could not be asked) that the user
    owns the message."""
