"""The OAuth2 flows, with authlib's OAuth2 client (any RFC 6749 provider):

- :func:`sign_in`: ``agent login``, by the configured ``oauth2_flow``: the browser
  (:mod:`.loopback`) or the device grant;
- :func:`device_login`: RFC 8628's device authorization grant for ``agent login``: shows
  the verification address and the user code, polls the token endpoint (respecting
  ``interval`` and ``slow_down``) and keeps the grant (:mod:`.store`);
- :func:`access_token`: a valid access token for a login, refreshed when less than
  :func:`refresh_margin` of its life is left; a rotated refresh token is kept;
- :func:`check_sign_in`: whether the stored grant works (for ``agent check`` and
  ``agent status``).

Errors: :class:`LoginRequired` (an :class:`AuthError`) when only a new ``agent login``
helps (no grant, ``invalid_grant`` = expired or revoked, a client the provider no longer
accepts); :class:`TransientError` when the token endpoint cannot be reached or is busy.
No token ever goes into a message, a log line or a repr.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.integrations.requests_client import OAuthError as _OAuthError
from authlib.oauth2.rfc8628 import DEVICE_CODE_GRANT_TYPE

from imapsync_bridge.config import MailServer, OAuth2Settings
from imapsync_bridge.errors import AuthError, ConfigError, TransientError
from imapsync_bridge.oauth2.providers import Endpoints, endpoints
from imapsync_bridge.oauth2.store import Grant, TokenStore

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 30.0
MAX_MARGIN = 300.0  # refresh at the latest 5 min before expiry (Microsoft: 60-90 min life)
#: Token endpoint answers that a retry will not cure: sign in again.
_SIGN_IN_AGAIN = {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope"}


class LoginRequired(AuthError):
    """No usable OAuth2 grant: the user must run ``agent login`` again."""


@dataclass(frozen=True)
class AccessToken:
    value: str
    expires_at: float  # epoch seconds
    renew_at: float  # from here on it counts as used up (see refresh_margin)

    def __repr__(self) -> str:
        return f"AccessToken(expires_at={self.expires_at:.0f})"


def refresh_margin(lifetime: float) -> float:
    """How long before expiry a token counts as used up: a quarter of its life, at most
    :data:`MAX_MARGIN`, so a login never starts with a token about to lapse."""
    return min(MAX_MARGIN, max(lifetime, 4.0) / 4)


def store_of(server: MailServer) -> TokenStore:
    settings = settings_of(server)
    return TokenStore(server.role, server.username, server.host, settings.state_dir)


def login_hint(server: MailServer) -> str:
    settings = settings_of(server)
    return f"run `imapsync-bridge agent login --config {settings.config_path} {server.role}`"


def access_token(server: MailServer) -> AccessToken:
    """A valid access token for *server* (refreshed and stored when needed)."""
    store = store_of(server)
    with store.locked():
        grant = store.load()
        if grant is None:
            raise LoginRequired(
                f"[{server.role}] no OAuth2 sign-in for {server.username}@{server.host} yet: "
                f"{login_hint(server)}"
            )
        if grant.access_token and time.time() < _renew_at(grant):
            return AccessToken(grant.access_token, grant.expires_at, _renew_at(grant))
        fresh = _refresh(server, grant)
        store.save(fresh)
    log.info(
        "[%s] OAuth2 access token refreshed (valid %.0f s%s)",
        server.role,
        fresh.lifetime,
        ", new refresh token kept" if fresh.refresh_token != grant.refresh_token else "",
    )
    return AccessToken(fresh.access_token, fresh.expires_at, _renew_at(fresh))


def _renew_at(grant: Grant) -> float:
    return grant.expires_at - refresh_margin(grant.lifetime)


def forget_access_token(server: MailServer) -> None:
    """The server refused the access token: the next login refreshes first."""
    store = store_of(server)
    with store.locked():
        grant = store.load()
        if grant is not None and grant.access_token:
            store.save(Grant(grant.refresh_token, credential=grant.credential))


def check_sign_in(server: MailServer) -> str | None:
    """None when the stored grant gives an access token now, else the one-line reason
    (with what to do). For ``agent check`` and ``agent status``; refreshing may rotate
    the stored refresh token, as any use does."""
    if server.auth != "oauth2":
        return None
    try:
        access_token(server)
    except (AuthError, TransientError, ConfigError) as exc:
        return str(exc)
    return None


def sign_in(server: MailServer, show: Callable[[str], None], open_browser: bool = True) -> str:
    """``agent login`` for *server* by its ``oauth2_flow``; says where the grant went.
    *open_browser*: the browser flow may start the desktop's browser."""
    if settings_of(server).flow == "browser":
        from imapsync_bridge.oauth2.loopback import browser_login

        return browser_login(server, show, open_browser=open_browser)
    return device_login(server, show)


def keep(server: MailServer, token: dict[str, Any]) -> str:
    """Store the grant a sign-in got; says where it went."""
    grant = _grant(token, server.role, previous=None)
    store = store_of(server)
    with store.locked():
        return store.save(grant)


def device_login(server: MailServer, show: Callable[[str], None]) -> str:
    """RFC 8628 device sign-in for *server*; says where the grant was stored."""
    settings = settings_of(server)
    ends = endpoints(settings, server.role)
    with client(settings, ends) as session:
        answer = _post(session, ends.device_authorization, server.role,
                       data={"client_id": settings.client_id, "scope": ends.scope})  # fmt: skip
        try:
            device_code = str(answer["device_code"])
            user_code = str(answer["user_code"])
            address = str(answer.get("verification_uri") or answer["verification_url"])
            interval = float(answer.get("interval", 5))
            deadline = time.monotonic() + float(answer.get("expires_in", 900))
        except (KeyError, TypeError, ValueError):
            raise AuthError(
                f"[{server.role}] the device authorization endpoint gave no usable code"
            ) from None
        show(
            f"To sign in to {server.role.upper()} as {server.username}, open {address} on "
            f"any device and enter the code {user_code}"
        )
        if answer.get("verification_uri_complete"):
            show(f"(or open {answer['verification_uri_complete']})")
        show("waiting for the approval...")
        while time.monotonic() < deadline:
            time.sleep(interval)
            try:
                token = session.fetch_token(
                    ends.token, grant_type=DEVICE_CODE_GRANT_TYPE, device_code=device_code,
                    timeout=HTTP_TIMEOUT,
                )  # fmt: skip
            except _OAuthError as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += 5  # RFC 8628 section 3.5
                    continue
                if exc.error == "expired_token":
                    break
                if exc.error == "access_denied":
                    raise AuthError(f"[{server.role}] the sign-in was declined") from None
                raise AuthError(f"[{server.role}] sign-in refused: {describe(exc)}") from None
            except requests.RequestException as exc:
                raise TransientError(
                    f"[{server.role}] cannot reach the token endpoint: {type(exc).__name__}"
                ) from None
            return keep(server, token)
    raise AuthError(
        f"[{server.role}] the code expired before it was approved; run `agent login` again"
    )


# -- helpers -----------------------------------------------------------------------------


def settings_of(server: MailServer) -> OAuth2Settings:
    if server.auth != "oauth2" or server.oauth2 is None:
        raise ConfigError(
            f"[{server.role}] auth is not oauth2: set auth = oauth2 and its keys "
            "(docs/oauth2.md), or use a password (`imapsync-bridge set-password`)"
        )
    return server.oauth2


def client(settings: OAuth2Settings, ends: Endpoints, **options: str) -> OAuth2Session:
    """A public client: no secret, or an installed app's (Google's Desktop clients
    send theirs, which Google does not treat as confidential) in the request body."""
    return OAuth2Session(
        client_id=settings.client_id,
        client_secret=settings.client_secret or None,
        scope=ends.scope,
        token_endpoint=ends.token,
        token_endpoint_auth_method="client_secret_post" if settings.client_secret else "none",
        **options,
    )


def _post(session: OAuth2Session, url: str, role: str, data: dict[str, str]) -> dict[str, Any]:
    try:
        response = session.post(url, data=data, withhold_token=True, timeout=HTTP_TIMEOUT)
        answer = response.json()
    except requests.RequestException as exc:
        raise TransientError(f"[{role}] cannot reach {url}: {type(exc).__name__}") from None
    except ValueError:
        raise AuthError(f"[{role}] {url} answered {response.status_code} without JSON") from None
    if not isinstance(answer, dict) or "error" in answer:
        error = answer.get("error") if isinstance(answer, dict) else None
        text = answer.get("error_description", "") if isinstance(answer, dict) else ""
        raise AuthError(f"[{role}] {url} refused the sign-in: {error} {text}".rstrip())
    return answer


def _refresh(server: MailServer, grant: Grant) -> Grant:
    settings = settings_of(server)
    ends = endpoints(settings, server.role)
    with client(settings, ends) as session:
        try:
            token = session.refresh_token(
                ends.token, refresh_token=grant.refresh_token, timeout=HTTP_TIMEOUT
            )
        except _OAuthError as exc:
            if exc.error in _SIGN_IN_AGAIN:
                raise LoginRequired(
                    f"[{server.role}] the OAuth2 sign-in of {server.username}@{server.host} "
                    f"no longer works ({describe(exc)}): {login_hint(server)}"
                ) from None
            raise TransientError(
                f"[{server.role}] the token endpoint refused a refresh: {describe(exc)}"
            ) from None
        except requests.RequestException as exc:
            raise TransientError(
                f"[{server.role}] cannot reach the token endpoint {ends.token}: "
                f"{type(exc).__name__}"
            ) from None
    return _grant(token, server.role, previous=grant)


def _grant(token: dict[str, Any], role: str, previous: Grant | None) -> Grant:
    access = token.get("access_token")
    refresh = token.get("refresh_token") or (previous.refresh_token if previous else None)
    if not access or not refresh:
        raise AuthError(
            f"[{role}] the provider issued no {'access' if not access else 'refresh'} token; "
            "for Microsoft the scopes need offline_access"
        )
    lifetime = float(token.get("expires_in") or 3600)
    grown_from = previous.credential if previous else ""  # a rotation keeps the origin
    return Grant(str(refresh), str(access), time.time() + lifetime, lifetime, grown_from)


def describe(exc: _OAuthError) -> str:
    text = " ".join(str(exc.description or "").split())[:200]
    return f"{exc.error}: {text}" if text else str(exc.error)
