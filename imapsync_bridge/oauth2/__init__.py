"""OAuth2 sign-in for the corporate IMAP and SMTP servers (``auth = oauth2``).

- :mod:`.providers`: built-in endpoints and scopes, the SASL strings (pure, no I/O);
- :mod:`.store`: where the grant (refresh token, current access token) is kept;
- :mod:`.tokens`: the device sign-in (RFC 8628), refreshing, and the check that
  ``agent check`` / ``agent status`` call;
- :mod:`.loopback`: the browser sign-in (RFC 8252: authorization code with PKCE and a
  loopback redirect, or the redirected address pasted), Google's way.
"""
