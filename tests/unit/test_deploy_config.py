"""The shipped production example parses, and is refused until its placeholder
secrets are replaced (production refuses placeholders)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.config import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config" / "production.example.toml"


def test_example_is_refused_with_its_placeholder_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFA_BROKER_CONFIG", str(EXAMPLE))
    with pytest.raises(ValidationError, match="placeholder"):
        Settings()


def test_example_loads_once_real_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFA_BROKER_CONFIG", str(EXAMPLE))
    monkeypatch.setenv("AIFA_BROKER_SESSION_SECRET", "a-real-random-session-secret-value")
    monkeypatch.setenv("AIFA_BROKER_DASHBOARD_OIDC__CLIENT_SECRET", "a-real-client-secret")
    monkeypatch.setenv("AIFA_BROKER_WEBHOOKS", '[{"name": "quota-desk", "url": "https://hooks.example.eu/aifa",'
                                              ' "secret": "a-real-webhook-secret-value"}]')
    settings = Settings()
    assert settings.mode == "production" and settings.oidc_issuers[0].role_map
    assert settings.access_modes["playground"].max_gpus_per_job == 4
    assert settings.dashboard_oidc is not None and settings.dashboard_oidc.client_secret == "a-real-client-secret"
