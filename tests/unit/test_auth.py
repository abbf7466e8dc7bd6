"""Token validation: embedded issuer and OIDC issuers (discovery + JWKS over real HTTP)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from broker.auth import Authenticator, issue_token
from broker.config import OIDCIssuer, Settings
from broker.errors import Unauthenticated


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/x.db", **kw)


def test_embedded_token_roundtrip_and_roles(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    tok = issue_token(s, sub="alice", roles=["quota_manager"])
    p = Authenticator(s).authenticate(tok)
    assert p.name == "alice" and p.roles == frozenset({"quota_manager"})
    assert (tmp_path / "jwt_signing_key.json").stat().st_mode & 0o777 == 0o600


def test_unknown_role_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        issue_token(_settings(tmp_path), sub="a", roles=["root"])


def _claims(**over: object) -> dict:
    now = int(time.time())
    return {"iss": "aifa-broker-embedded", "aud": "aifa-broker", "sub": "a", "iat": now, "nbf": now,
            "exp": now + 60, **over}


@pytest.mark.parametrize("over", [
    {"exp": int(time.time()) - 3600}, {"nbf": int(time.time()) + 3600}, {"aud": "other"},
    {"iss": "someone-else"}, {"sub": None},
])
def test_embedded_rejects_bad_claims(tmp_path: Path, over: dict) -> None:
    s = _settings(tmp_path)
    auth = Authenticator(s)
    from broker.auth import load_or_create_signing_key

    key = load_or_create_signing_key(s)
    claims = {k: v for k, v in _claims(**over).items() if v is not None}
    tok = jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key)
    with pytest.raises(Unauthenticated):
        auth.authenticate(tok)


def test_forged_and_malformed_tokens(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    auth = Authenticator(s)
    other = ECKey.generate_key("P-256")
    forged = jwt.encode({"alg": "ES256"}, _claims(), other)
    hs = jwt.encode({"alg": "HS256"}, _claims(), OctKey.generate_key(256))
    for bad in (forged, hs, "abc", "a.b.c", "", "x" * 20000, forged[:-5] + "AAAAA"):
        with pytest.raises(Unauthenticated):
            auth.authenticate(bad)


class _IdP:
    """A JWKS + discovery document served over HTTP on loopback (signing keys are ours)."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, auto_kid=True)
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": idp.issuer, "jwks_uri": idp.issuer + "/jwks"}
                elif self.path == "/jwks":
                    body = {"keys": [idp.key.as_dict(private=False)]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, alg: str = "RS256", key: object = None, **over: object) -> str:
        claims = {**_claims(iss=self.issuer, aud="aifa"), "entitlements": ["urn:x:qm"], **over}
        k = key or self.key
        return jwt.encode({"alg": alg, "kid": getattr(k, "kid", None) or "x"}, claims, k)


@pytest.fixture
def idp():  # type: ignore[no-untyped-def]
    server = _IdP()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_oidc_issuer_with_role_mapping(tmp_path: Path, idp: _IdP) -> None:
    s = _settings(tmp_path, oidc_issuers=[OIDCIssuer(issuer=idp.issuer, audience="aifa",
                                                     roles_claim="entitlements",
                                                     role_map={"urn:x:qm": "quota_manager"})])
    p = Authenticator(s).authenticate(idp.token())
    assert p.name == "a" and p.is_quota_manager


def test_oidc_rejects_wrong_alg_aud_and_unknown_key(tmp_path: Path, idp: _IdP) -> None:
    s = _settings(tmp_path, oidc_issuers=[OIDCIssuer(issuer=idp.issuer, audience="aifa")])
    auth = Authenticator(s)
    stranger = RSAKey.generate_key(2048, auto_kid=True)
    for bad in (idp.token(aud="other"), idp.token(key=stranger), idp.token(exp=1),
                idp.token(alg="HS256", key=OctKey.generate_key(256))):
        with pytest.raises(Unauthenticated):
            auth.authenticate(bad)


def test_production_mode_requires_issuers_and_postgres(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Settings(mode="production", data_dir=tmp_path)


def test_verified_token_cache_never_outlives_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _settings(tmp_path)
    auth = Authenticator(s)
    tok = issue_token(s, sub="alice", roles=[], lifetime=5)
    assert auth.authenticate(tok).name == "alice"
    assert auth.authenticate(tok).name == "alice"  # second time from the cache
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 120)  # past exp + leeway
    with pytest.raises(Unauthenticated):
        auth.authenticate(tok)


def test_verified_recently_answers_only_for_a_token_verified_and_still_valid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's event-loop fast path: never a verification, never a stale answer."""
    s = _settings(tmp_path)
    auth = Authenticator(s)
    tok = issue_token(s, sub="alice", roles=[], lifetime=5)
    assert auth.verified_recently(tok) is None  # never verified: the caller must verify
    head, body, sig = tok.split(".")
    forged = f"{head}.{body}.{sig[:-2] + ('AA' if not sig.endswith('AA') else 'BB')}"
    auth.authenticate(tok)
    hit = auth.verified_recently(tok)
    assert hit is not None and hit.name == "alice"
    assert auth.verified_recently(forged) is None
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 120)  # past exp
    assert auth.verified_recently(tok) is None


def test_tampered_token_is_not_served_from_the_cache(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    auth = Authenticator(s)
    tok = issue_token(s, sub="alice", roles=[])
    auth.authenticate(tok)
    head, body, sig = tok.split(".")
    forged_sig = sig[:-2] + ("AA" if not sig.endswith("AA") else "BB")
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"{head}.{body}.{forged_sig}")


def test_a_token_is_hashed_once_per_authentication(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key is computed once whether the cache answers or not (it was computed
    up to three times on a miss)."""
    import broker.auth as auth_module

    s = _settings(tmp_path)
    auth = Authenticator(s)
    tok = issue_token(s, sub="alice", roles=[])
    real = auth_module.hashlib.sha256
    calls: list[bytes] = []

    def counting(data: bytes) -> object:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(auth_module.hashlib, "sha256", counting)
    assert auth.authenticate(tok).name == "alice"  # a miss: verified, then cached
    assert len(calls) == 1
    assert auth.authenticate(tok).name == "alice"  # a hit
    assert len(calls) == 2
    assert auth.verified_recently(tok) is not None
    assert len(calls) == 3
