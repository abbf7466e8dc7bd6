"""Browser login through the site's OpenID provider: authorization code + PKCE (S256),
with authlib's Starlette client. Configured by ``Settings.dashboard_oidc``."""

from __future__ import annotations

from typing import Any

from broker.auth import GLOBAL_ROLES
from broker.config import DashboardOIDC

CLIENT_NAME = "aifa_idp"


def make_client(cfg: DashboardOIDC) -> Any:
    """An authlib Starlette OAuth client for ``cfg`` (imported lazily: only when configured)."""
    from authlib.integrations.starlette_client import OAuth

    kwargs: dict[str, Any] = {"scope": cfg.scope, "code_challenge_method": "S256"}
    if not cfg.client_secret:
        kwargs["token_endpoint_auth_method"] = "none"  # noqa: S105 - public client: PKCE alone
    oauth = OAuth()
    oauth.register(CLIENT_NAME, client_id=cfg.client_id, client_secret=cfg.client_secret or None,
                   server_metadata_url=cfg.server_metadata_url, client_kwargs=kwargs)
    return oauth.create_client(CLIENT_NAME)


def roles_from_claims(claims: dict[str, Any], cfg: DashboardOIDC) -> frozenset[str]:
    """Global broker roles from the configured claim (list or space-separated), mapped."""
    raw = claims.get(cfg.roles_claim, [])
    values = raw.split() if isinstance(raw, str) else [str(v) for v in raw] if isinstance(raw, list) else []
    return frozenset({cfg.role_map.get(v, v) for v in values} & GLOBAL_ROLES)


async def identity(client: Any, request: Any, cfg: DashboardOIDC) -> tuple[str, frozenset[str], str | None]:
    """Finish the code flow (state, PKCE verifier, id_token validation by authlib) and
    return the user name, roles and e-mail. Claims missing from the id_token are read
    from the userinfo endpoint."""
    token = await client.authorize_access_token(request)
    claims: dict[str, Any] = dict(token.get("userinfo") or {})
    if cfg.roles_claim not in claims or cfg.username_claim not in claims:
        claims = {**dict(await client.userinfo(token=token)), **claims}
    name = claims.get(cfg.username_claim)
    if not isinstance(name, str) or not name:
        raise ValueError(f"the identity provider sent no {cfg.username_claim} claim")
    email = claims.get("email")
    return name, roles_from_claims(claims, cfg), email if isinstance(email, str) else None
