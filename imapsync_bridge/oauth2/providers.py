"""Where each provider's device sign-in and token endpoints are, which scopes a role
needs, and the SASL initial responses that carry an access token. No I/O here.

Microsoft Entra: ``login.microsoftonline.com/<tenant>/oauth2/v2.0/{devicecode,authorize,token}``
with the Exchange Online scopes (IMAP.AccessAsUser.All for IMAP, SMTP.Send for SMTP) and
``offline_access`` (without it no refresh token is issued). Google: the documented device,
authorization and token endpoints and the one scope Gmail's IMAP and SMTP accept
(``https://mail.google.com/``); its authorization request asks for offline access with a
consent prompt, without which Google issues no refresh token on a second sign-in.
``generic``: whatever the configuration names. docs/oauth2.md says how to register a client.
"""

from __future__ import annotations

from dataclasses import dataclass

from imapsync_bridge.config import OAuth2Settings

MICROSOFT_LOGIN = "https://login.microsoftonline.com"
MICROSOFT_SCOPES = {
    "imap": ("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"),
    "smtp": ("https://outlook.office.com/SMTP.Send", "offline_access"),
}
GOOGLE_DEVICE = "https://oauth2.googleapis.com/device/code"
GOOGLE_AUTHORIZE = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_TOKEN = "https://oauth2.googleapis.com/token"
GOOGLE_AUTHORIZE_PARAMS = (("access_type", "offline"), ("prompt", "consent"))
GOOGLE_SCOPES = ("https://mail.google.com/",)
DEFAULT_TENANT = "organizations"  # any work or school account (Microsoft's own default)


@dataclass(frozen=True)
class Endpoints:
    device_authorization: str
    token: str
    scopes: tuple[str, ...]
    authorization: str = ""  # the browser sign-in's authorization endpoint
    authorize_params: tuple[tuple[str, str], ...] = ()  # a provider's extra parameters

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)


def endpoints(settings: OAuth2Settings, role: str) -> Endpoints:
    """The endpoints and scopes for *role* (``imap`` or ``smtp``); configured endpoints
    and scopes win over the built-in ones, so a national cloud or a proxy can be named."""
    scopes = tuple(settings.scopes.split())
    if settings.provider == "microsoft":
        base = f"{MICROSOFT_LOGIN}/{settings.tenant or DEFAULT_TENANT}/oauth2/v2.0"
        return Endpoints(
            settings.device_authorization_endpoint or f"{base}/devicecode",
            settings.token_endpoint or f"{base}/token",
            scopes or MICROSOFT_SCOPES[role],
            settings.authorization_endpoint or f"{base}/authorize",
        )
    if settings.provider == "google":
        return Endpoints(
            settings.device_authorization_endpoint or GOOGLE_DEVICE,
            settings.token_endpoint or GOOGLE_TOKEN,
            scopes or GOOGLE_SCOPES,
            settings.authorization_endpoint or GOOGLE_AUTHORIZE,
            GOOGLE_AUTHORIZE_PARAMS,
        )
    return Endpoints(
        settings.device_authorization_endpoint,
        settings.token_endpoint,
        scopes,
        settings.authorization_endpoint,
    )


def xoauth2(user: str, token: str) -> str:
    """The XOAUTH2 initial response (Google's and Microsoft's format)."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def oauthbearer(user: str, token: str, host: str, port: int) -> str:
    """The OAUTHBEARER initial response (RFC 7628 section 3.1), with the GS2 header."""
    return f"n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"


def pick_mechanism(offered: set[str]) -> str | None:
    """OAUTHBEARER (the standard) when offered, else XOAUTH2 (Microsoft offers only
    that); None when the server offers neither."""
    for mechanism in ("OAUTHBEARER", "XOAUTH2"):
        if mechanism in offered:
            return mechanism
    return None
