"""Identity towards slurmrestd: which headers make a request act as a POSIX user.

Two modes (setting ``auth``):

- ``jwt_key``: the broker holds Slurm's HS256 JWT key and mints a short-lived
  token per user (claims ``sun`` = POSIX user name, ``iat``, ``exp``), cached
  until shortly before it expires.
- ``proxy_token``: one long-lived token of a privileged proxy user (root or
  SlurmUser on the Slurm side), with ``X-SLURM-USER-NAME`` naming the end user.

Tokens are secrets: they are never logged and never part of an error message.
"""

from __future__ import annotations

import abc
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import OctKey

from adapters.slurm_rest.settings import RestSettings
from broker.adapter import AdapterConfigError

USER_HEADER = "X-SLURM-USER-NAME"
TOKEN_HEADER = "X-SLURM-USER-TOKEN"  # noqa: S105 - a header name, not a secret

_USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]*\$?$", re.IGNORECASE)


def check_username(username: str) -> str:
    """A POSIX user name safe to put in a header and a token; else AdapterConfigError."""
    if not username or len(username) > 64 or not _USERNAME_RE.match(username):
        raise AdapterConfigError(f"slurm_rest: invalid POSIX user name {username!r}")
    return username


class Identity(abc.ABC):
    """Produces the authentication headers for a request made as ``username``."""

    @abc.abstractmethod
    def headers(self, username: str) -> dict[str, str]:
        """Headers that make slurmrestd act as ``username``."""

    def forget(self, username: str) -> None:  # noqa: B027 - optional hook
        """Drop any cached credential of ``username`` (after a 401)."""


class JwtKeyIdentity(Identity):
    """Mints per-user HS256 tokens with Slurm's JWT key; thread-safe cache."""

    #: renew when less than this fraction of the lifetime is left
    RENEW_FRACTION = 0.2

    def __init__(self, key_file: str, lifetime_seconds: int, clock: Callable[[], float] = time.time) -> None:
        self._key_file = key_file
        self._lifetime = max(30, int(lifetime_seconds))
        self._clock = clock
        self._key: OctKey | None = None
        self._cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def _load_key(self) -> OctKey:
        if self._key is None:
            try:
                raw = Path(self._key_file).read_bytes()
            except OSError as exc:
                raise AdapterConfigError(
                    f"slurm_rest: cannot read jwt_key_file {self._key_file}: {exc.strerror}"
                ) from exc
            if len(raw) < 16:
                raise AdapterConfigError(f"slurm_rest: jwt_key_file {self._key_file} is too short")
            self._key = OctKey.import_key(raw)
        return self._key

    def token(self, username: str) -> str:
        """A valid token for ``username`` (from the cache when not close to expiry)."""
        check_username(username)
        now = self._clock()
        with self._lock:
            cached = self._cache.get(username)
            if cached and cached[1] - now > self._lifetime * self.RENEW_FRACTION:
                return cached[0]
            issued = int(now)
            expires = issued + self._lifetime
            claims = {"sun": username, "iat": issued, "exp": expires}
            token = jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, self._load_key())
            self._cache[username] = (token, float(expires))
            return token

    def headers(self, username: str) -> dict[str, str]:
        """``X-SLURM-USER-NAME`` + a freshly minted or cached ``X-SLURM-USER-TOKEN``."""
        return {USER_HEADER: username, TOKEN_HEADER: self.token(username)}

    def forget(self, username: str) -> None:
        """Drop the cached token of ``username``."""
        with self._lock:
            self._cache.pop(username, None)


class ProxyTokenIdentity(Identity):
    """A privileged proxy user's token; the end user goes in ``X-SLURM-USER-NAME``."""

    def __init__(self, token_file: str) -> None:
        self._token_file = token_file
        self._token: str | None = None
        self._lock = threading.Lock()

    def _load(self) -> str:
        with self._lock:
            if self._token is None:
                try:
                    text = Path(self._token_file).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise AdapterConfigError(
                        f"slurm_rest: cannot read proxy_token_file {self._token_file}: {exc.strerror}"
                    ) from exc
                if not text:
                    raise AdapterConfigError(f"slurm_rest: proxy_token_file {self._token_file} is empty")
                self._token = text
            return self._token

    def headers(self, username: str) -> dict[str, str]:
        """The end user's name with the proxy token."""
        return {USER_HEADER: check_username(username), TOKEN_HEADER: self._load()}

    def forget(self, username: str) -> None:
        """Re-read the token file next time (it may have been rotated)."""
        with self._lock:
            self._token = None


def identity_from_settings(settings: RestSettings) -> Identity:
    """The identity provider configured by ``settings.auth``."""
    if settings.auth == "jwt_key":
        assert settings.jwt_key_file is not None
        return JwtKeyIdentity(settings.jwt_key_file, settings.token_lifetime_seconds)
    assert settings.proxy_token_file is not None
    return ProxyTokenIdentity(settings.proxy_token_file)
