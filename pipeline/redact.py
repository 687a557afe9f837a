"""Keep credentials out of everything a run writes or prints: error messages, manifests, logs, the summary.

Masks what looks like a secret wherever it appears (endpoint userinfo, presigned-URL signatures and
credentials, AWS access key ids) plus the exact values this process was given (`register_secret`, called with
the job's S3 keys by every process that holds them)."""

from __future__ import annotations

import re

MASK = "***"
_PATTERNS = [
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"), MASK + "@"),  # scheme://user:password@host
    (re.compile(r"(?i)\b(X-Amz-(?:Signature|Credential|Security-Token)|AWSAccessKeyId|Signature)=[^&\s'\"]+"),
     r"\1=" + MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
]
_secrets: set[str] = set()


def register_secret(*values: str | None) -> None:
    """Mask these exact strings from now on in this process (short ones would mask ordinary words)."""
    _secrets.update(v for v in values if v and len(v) >= 8)


def redact(text: str) -> str:
    for value in sorted(_secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_url(url: str | None) -> str | None:
    return None if url is None else _PATTERNS[0][0].sub(MASK + "@", url)


__all__ = ["MASK", "redact", "redact_url", "register_secret"]
