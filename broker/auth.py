"""Bearer-token authentication (joserfc; no hand-written JWT code).

Two sources of tokens:

- **embedded** mode: the broker is its own issuer. An ES256 key is created once in
  the data directory (``jwt_signing_key.json``, mode 0600) or read from
  ``token_signing_key_file`` (shared by replicas); ``aifa-broker token`` signs tokens
  with it. Keys in ``token_verification_key_files`` are accepted too, so the signing
  key can be rotated without invalidating tokens in flight (docs/operations.md).
- **production** mode: tokens from configured OIDC issuers, validated against the
  issuer's JWKS (found by discovery, cached, refetched once on an unknown ``kid``),
  RS256/ES256 only, strict ``iss``/``aud``/``exp``/``nbf``. Roles come from a
  configurable claim, optionally mapped (AARC entitlements → broker roles).

Every failure becomes :class:`~broker.errors.Unauthenticated`; the reason is
logged at debug level without the token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

from broker.config import OIDCIssuer, Settings
from broker.errors import Unauthenticated

log = logging.getLogger(__name__)

GLOBAL_ROLES = frozenset({"quota_manager", "sysadmin"})
MAX_TOKEN_BYTES = 16_384
CLOCK_LEEWAY_SECONDS = 30
#: how long a verified token is trusted without verifying it again (never past its exp)
VERIFIED_TTL_SECONDS = 60.0
VERIFIED_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    name: str
    roles: frozenset[str]
    email: str | None = None

    @property
    def is_quota_manager(self) -> bool:
        return "quota_manager" in self.roles

    @property
    def is_sysadmin(self) -> bool:
        return "sysadmin" in self.roles


def _signing_key_path(settings: Settings) -> Path:
    return settings.token_signing_key_file or settings.data_dir / "jwt_signing_key.json"


def load_or_create_signing_key(settings: Settings) -> ECKey:
    """The embedded issuer's key: ``token_signing_key_file`` when set (it must exist —
    replicas share it, none may invent its own), else ``jwt_signing_key.json`` in the
    data directory, created on first use with owner-only permissions."""
    path = _signing_key_path(settings)
    if path.exists():
        return ECKey.import_key(json.loads(path.read_text()))
    if settings.token_signing_key_file is not None:
        raise ValueError(f"token_signing_key_file {path} does not exist "
                         "(make one with `aifa-broker signing-key FILE`)")
    return write_signing_key(path)


def write_signing_key(path: Path) -> ECKey:
    """A new ES256 signing key written to ``path`` (mode 0600; never overwrites a key)."""
    key = ECKey.generate_key("P-256", auto_kid=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(key.as_dict(private=True), fh)
    try:
        os.link(tmp, path)  # atomic and refuses to overwrite a key made concurrently
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return ECKey.import_key(json.loads(path.read_text()))


def embedded_key_set(settings: Settings) -> KeySet:
    """The keys embedded-issuer tokens are checked with: the signing key, plus the
    ``token_verification_key_files`` (keys being rotated in or out; private or public
    JWKs — only their public part is used)."""
    keys: list[Any] = [load_or_create_signing_key(settings)]
    for path in settings.token_verification_key_files:
        try:
            extra = ECKey.import_key(json.loads(Path(path).expanduser().read_text()))
        except (OSError, ValueError, JoseError) as exc:
            raise ValueError(f"token verification key {path} cannot be read: {exc}") from exc
        keys.append(ECKey.import_key(extra.as_dict(private=False)))
    return KeySet(keys)


def issue_token(settings: Settings, *, sub: str, roles: list[str], lifetime: int | None = None,
                email: str | None = None) -> str:
    """A token of the embedded issuer (CLI ``aifa-broker token``)."""
    unknown = set(roles) - GLOBAL_ROLES
    if unknown:
        raise ValueError(f"unknown role(s): {', '.join(sorted(unknown))}")
    key = load_or_create_signing_key(settings)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.token_issuer, "aud": settings.token_audience, "sub": sub,
        "roles": sorted(set(roles)), "iat": now, "nbf": now,
        "exp": now + (lifetime or settings.token_lifetime_seconds),
    }
    if email:
        claims["email"] = email
    return jwt.encode({"alg": "ES256", "kid": key.kid, "typ": "JWT"}, claims, key)


def _validate(token: str, keys: KeySet, *, issuer: str, audience: str, algorithms: list[str]) -> dict[str, Any]:
    try:
        decoded = jwt.decode(token, keys, algorithms=algorithms)
        registry = jwt.JWTClaimsRegistry(
            leeway=CLOCK_LEEWAY_SECONDS,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        registry.validate(decoded.claims)
    except (JoseError, ValueError, TypeError) as exc:
        log.debug("token rejected: %s", type(exc).__name__)
        raise Unauthenticated("The bearer token is invalid or expired.") from exc
    return dict(decoded.claims)


def _roles_from(claims: dict[str, Any], claim: str, role_map: dict[str, str]) -> frozenset[str]:
    raw = claims.get(claim, [])
    values = raw.split() if isinstance(raw, str) else [str(v) for v in raw] if isinstance(raw, list) else []
    roles = {role_map.get(v, v) for v in values}
    return frozenset(roles & GLOBAL_ROLES)


class OIDCKeyCache:
    """JWKS per issuer, found by discovery; refetched on an unknown kid (at most every 30 s)."""

    def __init__(self, http: httpx.Client | None = None) -> None:
        self._http = http or httpx.Client(timeout=10.0)
        self._lock = threading.Lock()
        self._keys: dict[str, KeySet] = {}
        self._fetched_at: dict[str, float] = {}

    def keys_for(self, issuer: OIDCIssuer, kid: str | None) -> KeySet:
        with self._lock:
            keys = self._keys.get(issuer.issuer)
            stale = time.monotonic() - self._fetched_at.get(issuer.issuer, 0.0) > 30
            if keys is None or (kid is not None and not _has_kid(keys, kid) and stale):
                keys = self._fetch(issuer)
                self._keys[issuer.issuer] = keys
                self._fetched_at[issuer.issuer] = time.monotonic()
            return keys

    def _fetch(self, issuer: OIDCIssuer) -> KeySet:
        url = issuer.discovery_url or issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            meta = self._http.get(url).raise_for_status().json()
            if meta.get("issuer") != issuer.issuer:
                raise Unauthenticated("The identity provider's discovery document names another issuer.")
            jwks = self._http.get(meta["jwks_uri"]).raise_for_status().json()
            return KeySet.import_key_set(jwks)
        except (httpx.HTTPError, KeyError, ValueError, JoseError) as exc:
            raise Unauthenticated("The identity provider's keys cannot be fetched.") from exc


def _has_kid(keys: KeySet, kid: str) -> bool:
    return any(k.kid == kid for k in keys.keys)


class Authenticator:
    """Turns a bearer token into a :class:`Principal` per the settings' mode."""

    def __init__(self, settings: Settings, key_cache: OIDCKeyCache | None = None) -> None:
        self.settings = settings
        self._key_cache = key_cache or OIDCKeyCache()
        self._embedded: KeySet | None = None
        #: sha256(token) → (principal, verified until): see :meth:`authenticate`
        self._verified: dict[bytes, tuple[Principal, float]] = {}
        if settings.mode == "embedded":
            self._embedded = embedded_key_set(settings)

    def authenticate(self, token: str) -> Principal:
        """The principal of a valid token; :class:`Unauthenticated` otherwise.

        A token verified in the last :data:`VERIFIED_TTL_SECONDS` (and not expired)
        is not verified again: a client sends the same token with every request,
        and the signature check was a visible share of each request's CPU."""
        if not token or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise Unauthenticated("The bearer token is missing or malformed.")
        digest = hashlib.sha256(token.encode()).digest()  # once: the lookup and the entry
        hit = self._lookup(digest)
        if hit is not None:
            return hit
        now = time.time()
        principal, expires = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_MAX:
            self._verified.clear()
        self._verified[digest] = (principal, min(expires, now + VERIFIED_TTL_SECONDS))
        return principal

    def verified_recently(self, token: str) -> Principal | None:
        """The principal of ``token`` if it was verified in the last
        :data:`VERIFIED_TTL_SECONDS` and has not expired since; None otherwise (then
        call :meth:`authenticate`). Never does I/O: the API calls it on its event loop."""
        if len(token) > MAX_TOKEN_BYTES:
            return None
        return self._lookup(hashlib.sha256(token.encode()).digest())

    def _lookup(self, digest: bytes) -> Principal | None:
        hit = self._verified.get(digest)
        if hit is not None and time.time() < hit[1]:
            return hit[0]
        return None

    def _verify(self, token: str) -> tuple[Principal, float]:
        header, unverified = _peek(token)
        if self._embedded is not None and unverified.get("iss") == self.settings.token_issuer:
            claims = _validate(token, self._embedded, issuer=self.settings.token_issuer,
                               audience=self.settings.token_audience, algorithms=["ES256"])
            return (Principal(str(claims["sub"]), _roles_from(claims, "roles", {}), claims.get("email")),
                    float(claims["exp"]))
        for issuer in self.settings.oidc_issuers:
            if unverified.get("iss") == issuer.issuer:
                keys = self._key_cache.keys_for(issuer, header.get("kid"))
                claims = _validate(token, keys, issuer=issuer.issuer, audience=issuer.audience,
                                   algorithms=list(issuer.algorithms))
                name = claims.get(issuer.username_claim)
                if not isinstance(name, str) or not name:
                    raise Unauthenticated(f"The token has no {issuer.username_claim} claim.")
                return (Principal(name, _roles_from(claims, issuer.roles_claim, issuer.role_map),
                                  claims.get("email")), float(claims["exp"]))
        raise Unauthenticated("The token's issuer is not trusted by this broker.")


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims WITHOUT verification, only to pick the issuer's keys."""
    try:
        compact = jws.extract_compact(token.encode())
        payload = json.loads(compact.payload)
    except (JoseError, ValueError, UnicodeDecodeError) as exc:
        raise Unauthenticated("The bearer token is malformed.") from exc
    if not isinstance(payload, dict):
        raise Unauthenticated("The bearer token is malformed.")
    return dict(compact.protected), payload
