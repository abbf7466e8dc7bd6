"""The adapter registry: plugins by name, and the dev-only local adapter refused in production."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.adapter import AdapterConfigError
from broker.config import OIDCIssuer, Settings
from broker.registry import AdapterRegistry


def _prod(tmp_path: Path, **kw: object) -> Settings:
    return Settings(mode="production", data_dir=tmp_path, database_url="postgresql+psycopg://x@127.0.0.1/x",
                    public_url="https://broker.example",
                    oidc_issuers=[OIDCIssuer(issuer="https://idp.example", audience="aifa")], **kw)


def test_local_adapter_refused_in_production(tmp_path: Path) -> None:
    with pytest.raises(AdapterConfigError, match="development only"):
        AdapterRegistry(_prod(tmp_path)).build(name="local", adapter="local", connection={})


def test_local_adapter_allowed_in_production_when_explicitly_enabled(tmp_path: Path) -> None:
    reg = AdapterRegistry(_prod(tmp_path, allow_local_adapter_in_production=True))
    adapter = reg.build(name="local", adapter="local", connection={})
    assert adapter.runs_as_broker_user
    adapter.close()


def test_unknown_adapter_is_a_config_error(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(AdapterConfigError, match="no plugin"):
        AdapterRegistry(settings).build(name="x", adapter="nope", connection={})


def test_production_refuses_placeholder_session_secret(tmp_path: Path) -> None:
    from broker.config import DashboardOIDC

    with pytest.raises(ValueError, match="session_secret"):
        _prod(tmp_path, dashboard_oidc=DashboardOIDC(server_metadata_url="https://idp/x", client_id="c",
                                                     client_secret="s3cr3t-value"), session_secret="changeme")
