"""Rotating the embedded issuer's signing key without downtime (docs/operations.md):
new key made → accepted everywhere → made the signing key with the old one still
accepted → old one dropped once its tokens have expired."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from joserfc import jws

from broker.auth import Authenticator, issue_token, write_signing_key
from broker.config import Settings
from broker.errors import Unauthenticated

BIN = str(Path(sys.executable).parent / "aifa-broker")


def _kid(token: str) -> str:
    return str(jws.extract_compact(token.encode()).protected["kid"])


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **kw)  # type: ignore[arg-type]


def test_signing_key_command_writes_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "jwt-2.json"
    done = subprocess.run([BIN, "signing-key", str(path)], capture_output=True, text=True, check=True)
    assert path.stat().st_mode & 0o777 == 0o600
    jwk = json.loads(path.read_text())
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and "d" in jwk and jwk["kid"] == done.stdout.strip()
    again = subprocess.run([BIN, "signing-key", str(path)], capture_output=True, text=True)
    assert again.returncode != 0 and "never overwritten" in again.stderr
    assert json.loads(path.read_text()) == jwk


def test_rotation_without_downtime(tmp_path: Path) -> None:
    old_key, new_key = tmp_path / "jwt-1.json", tmp_path / "jwt-2.json"
    for path in (old_key, new_key):  # what `aifa-broker signing-key PATH` does
        write_signing_key(path)

    # before: signed and checked with the old key
    before = _settings(tmp_path, token_signing_key_file=old_key)
    old_token = issue_token(before, sub="alice", roles=[])
    assert Authenticator(before).authenticate(old_token).name == "alice"

    # step 1: every replica also accepts the new key (it signs nothing yet)
    step1 = _settings(tmp_path, token_signing_key_file=old_key, token_verification_key_files=[new_key])
    assert Authenticator(step1).authenticate(old_token).name == "alice"

    # step 2: the new key signs; the old one is still accepted (tokens in flight)
    step2 = _settings(tmp_path, token_signing_key_file=new_key, token_verification_key_files=[old_key])
    new_token = issue_token(step2, sub="bob", roles=["quota_manager"])
    assert _kid(new_token) != _kid(old_token)
    for settings in (step1, step2):  # a replica not yet restarted accepts the new tokens too
        auth = Authenticator(settings)
        assert auth.authenticate(old_token).name == "alice"
        assert auth.authenticate(new_token).roles == frozenset({"quota_manager"})

    # step 3: after token_lifetime_seconds the old key goes; its tokens are refused
    step3 = _settings(tmp_path, token_signing_key_file=new_key)
    assert Authenticator(step3).authenticate(new_token).name == "bob"
    with pytest.raises(Unauthenticated):
        Authenticator(step3).authenticate(old_token)


def test_a_verification_key_never_signs_and_only_its_public_part_is_kept(tmp_path: Path) -> None:
    signing, extra = tmp_path / "jwt-1.json", tmp_path / "jwt-2.json"
    for path in (signing, extra):
        write_signing_key(path)
    settings = _settings(tmp_path, token_signing_key_file=signing, token_verification_key_files=[extra])
    assert _kid(issue_token(settings, sub="a", roles=[])) == json.loads(signing.read_text())["kid"]
    from broker.auth import embedded_key_set

    keys = embedded_key_set(settings).keys
    assert [k.kid for k in keys] == [json.loads(p.read_text())["kid"] for p in (signing, extra)]
    assert "d" not in keys[1].as_dict(private=False) and not keys[1].is_private


def test_a_configured_signing_key_that_is_missing_is_an_error(tmp_path: Path) -> None:
    settings = _settings(tmp_path, token_signing_key_file=tmp_path / "absent.json")
    with pytest.raises(ValueError, match="does not exist"):
        issue_token(settings, sub="a", roles=[])
    assert not (tmp_path / "absent.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="cannot be read"):
        Authenticator(_settings(tmp_path, token_verification_key_files=[bad]))
