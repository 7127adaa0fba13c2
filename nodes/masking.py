"""Masking secrets carried in URLs: the one helper every reader of a URL-shaped secret goes through.

A control plane's Redis URL may hold a password (``redis://:secret@host:6379/0``), a NanoCtrl address
may too (``http://user:secret@ctrl:4479``), and a client may post one to ``/nodes/add``. The REST API
shows them to non-staff readers masked, the audit trail stores them masked, logs and error messages
print them masked. See docs/architecture.md ("Who may join").
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://userinfo@ — the userinfo stops at the first "/", "@" or white space; a "@" inside a
# password must be percent-encoded in a valid URL, so the first "@" ends it.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]*)@")


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        return f"{match.group('scheme')}{user}:{MASK}@"
    # A user name alone is often a token (https://TOKEN@host): mask it whole.
    return f"{match.group('scheme')}{MASK}@"


def mask_credentials(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (a user name alone, which
    is often a token, is masked whole): ``redis://default:s3cret@h:6379/0`` becomes
    ``redis://default:***@h:6379/0``. Text without credentials comes back unchanged."""
    if "@" not in text:
        return text
    return _USERINFO.sub(_mask_userinfo, text)
