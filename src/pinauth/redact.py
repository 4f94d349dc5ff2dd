"""Credentials kept out of what people read: the access log and the demo's transcripts.

Every credential pinauth issues starts with a prefix naming its kind (API key, proxy
token, connect session, connect result). Wherever one turns up in text that is logged or
shown, such as a proxy token pasted where its `pt_…` id belongs in a path, only the
prefix and a few characters remain, as `pinauth api-keys list` shows keys.
"""

from __future__ import annotations

import re

SHOWN_CHARACTERS = 6
_CREDENTIAL = re.compile(
    rf"(pinauth_(?:sk|pt|cs|cr)_[A-Za-z0-9_-]{{0,{SHOWN_CHARACTERS}}})[A-Za-z0-9_-]*"
)


def redact_credentials(text: str) -> str:
    """`text` with every pinauth credential in it cut to its prefix and a few characters."""
    if "pinauth_" not in text:  # nearly every request's path: no regex on the hot path
        return text
    return _CREDENTIAL.sub("\\1…", text)
