"""Credentials never reach provenance, rows or messages: `redact` masks them in any text we record or print.

Masked: the user-info of a URL (`s3://KEY:SECRET@bucket/...`), query parameters that sign or authorise a request
(`X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, `token`, `sig`, `key`, ...), and the value of any
environment variable whose name says it holds a secret, wherever it appears. The environment itself is never recorded.
"""

from __future__ import annotations

import os
import re

MASK = "***"
SECRET_PARAMS = re.compile(r"(?i)([?&;](?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)|"
                           r"signature|sig|token|access_token|id_token|api[-_]?key|key|secret|password|passwd|pwd|"
                           r"auth|authorization|credential|sas|se?token|client_secret)=)[^&#\s'\"]*")
# user-info: `user@` or `user:password@`, the password possibly holding unescaped `/` (AWS secrets do)
USER_INFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^/@\s:'\"]+:[^@\s'\"]*|[^/@\s'\"]+)@")
SECRET_ENV = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE)")
MIN_SECRET = 12  # shorter environment values ("true", a test's "torture") would mask ordinary words


def env_secrets() -> list[str]:
    """Values of environment variables named like secrets, longest first (so a prefix never masks half of one)."""
    values = {v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_url(text: str) -> str:
    """`text` with the credentials written into URLs (user-info, signing parameters) replaced by `***`."""
    text = USER_INFO.sub(lambda m: f"{m.group(1)}{MASK}@", str(text))
    return SECRET_PARAMS.sub(lambda m: f"{m.group(1)}{MASK}", text)


def redact(text: str) -> str:
    """`text` with every credential replaced by `***`: those in URLs and the secret environment values."""
    text = redact_url(text)
    for value in env_secrets():
        text = text.replace(value, MASK)
    return text


def redact_all(value):
    """Every string inside a JSON-like value (dict keys too) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_all(k): redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(v) for v in value]
    return value
