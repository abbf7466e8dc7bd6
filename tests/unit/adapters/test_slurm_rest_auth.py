"""Identity (per-user JWTs, proxy token) and settings of the slurm_rest adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from adapters.slurm_rest.auth import (
    JwtKeyIdentity,
    ProxyTokenIdentity,
    check_username,
    identity_from_settings,
)
from adapters.slurm_rest.settings import RestSettings
from broker.adapter import AdapterConfigError

KEY = bytes(range(32))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt_hs256.key"
    path.write_bytes(KEY)
    return path


def test_minted_token_claims(key_file: Path) -> None:
    identity = JwtKeyIdentity(str(key_file), 300, clock=Clock(1_800_000_000))
    headers = identity.headers("alice")
    assert headers["X-SLURM-USER-NAME"] == "alice"
    token = jwt.decode(headers["X-SLURM-USER-TOKEN"], OctKey.import_key(KEY), algorithms=["HS256"])
    assert token.header["alg"] == "HS256"
    assert token.claims == {"sun": "alice", "iat": 1_800_000_000, "exp": 1_800_000_300}


def test_token_cached_until_near_expiry(key_file: Path) -> None:
    clock = Clock(1_800_000_000)
    identity = JwtKeyIdentity(str(key_file), 300, clock=clock)
    first = identity.token("alice")
    clock.now += 200  # 100 s left of 300: more than 20 %
    assert identity.token("alice") == first
    assert identity.token("bob") != first, "one token per user"
    clock.now += 50  # 50 s left: renew
    renewed = identity.token("alice")
    assert renewed != first
    identity.forget("alice")
    clock.now += 1
    assert identity.token("alice") != renewed


@pytest.mark.parametrize("name", ["", "al ice", "alice\nX-Evil: 1", "-rf", "a" * 65, "ali:ce"])
def test_bad_usernames_refused(name: str) -> None:
    with pytest.raises(AdapterConfigError):
        check_username(name)


@pytest.mark.parametrize("name", ["alice", "bob_2", "svc.user", "d-ops", "machine$"])
def test_good_usernames(name: str) -> None:
    assert check_username(name) == name


def test_missing_or_short_key_file(tmp_path: Path) -> None:
    with pytest.raises(AdapterConfigError, match="cannot read jwt_key_file"):
        JwtKeyIdentity(str(tmp_path / "none"), 300).token("alice")
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(AdapterConfigError, match="too short"):
        JwtKeyIdentity(str(short), 300).token("alice")


def test_proxy_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "token"
    path.write_text("  proxy-SECRET-token\n")
    identity = ProxyTokenIdentity(str(path))
    with caplog.at_level(logging.DEBUG):
        headers = identity.headers("bob")
    assert headers == {"X-SLURM-USER-NAME": "bob", "X-SLURM-USER-TOKEN": "proxy-SECRET-token"}
    path.write_text("rotated")
    assert identity.headers("bob")["X-SLURM-USER-TOKEN"] == "proxy-SECRET-token"
    identity.forget("bob")
    assert identity.headers("bob")["X-SLURM-USER-TOKEN"] == "rotated"
    assert "SECRET" not in caplog.text


def test_proxy_token_file_problems(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(AdapterConfigError, match="is empty"):
        ProxyTokenIdentity(str(empty)).headers("bob")
    with pytest.raises(AdapterConfigError, match="cannot read"):
        ProxyTokenIdentity(str(tmp_path / "none")).headers("bob")


# ------------------------------------------------------------------ settings

BASE = {"url": "http://127.0.0.1:6820/", "auth": "jwt_key", "jwt_key_file": "/k"}


def test_settings_defaults() -> None:
    cfg = RestSettings.from_mapping(BASE)
    assert cfg.url == "http://127.0.0.1:6820"
    assert (cfg.token_lifetime_seconds, cfg.timeout, cfg.connect_timeout) == (300, 30.0, 5.0)
    assert cfg.api_versions == () and cfg.query_username is None
    assert isinstance(identity_from_settings(cfg), JwtKeyIdentity)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("v0.0.42", ("v0.0.42",)), ("0.0.42", ("v0.0.42",)), (["v0.0.41", "v0.0.42"], ("v0.0.41", "v0.0.42"))],
)
def test_settings_api_version(value: Any, expected: tuple[str, ...]) -> None:
    assert RestSettings.from_mapping({**BASE, "api_version": value}).api_versions == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"url": None}, "'url' is required"),
        ({"url": "ftp://x"}, "url must be http"),
        ({"auth": "basic"}, "auth must be one of"),
        ({"jwt_key_file": None}, "needs jwt_key_file"),
        ({"auth": "proxy_token"}, "needs proxy_token_file"),
        ({"timeout": 0}, "'timeout' must be a positive number"),
        ({"timeout": True}, "'timeout' must be a positive number"),
        ({"api_version": 42}, "api_version must be"),
        ({"query_username": 5}, "'query_username' must be a string"),
    ],
)
def test_settings_errors(override: dict[str, Any], message: str) -> None:
    with pytest.raises(AdapterConfigError, match=message):
        RestSettings.from_mapping({**BASE, **override})


def test_proxy_settings() -> None:
    cfg = RestSettings.from_mapping(
        {"url": "https://rest.example", "auth": "proxy_token", "proxy_token_file": "/t", "timeout": 2}
    )
    assert cfg.connect_timeout == 2.0
    assert isinstance(identity_from_settings(cfg), ProxyTokenIdentity)
