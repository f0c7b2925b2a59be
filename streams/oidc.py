"""OAUTHBEARER for the aggregator: librdkafka's ``sasl.oauthbearer.method=oidc`` in aiokafka's terms.

The workers' librdkafka fetches tokens itself from ``kafka.properties``
(``sasl.oauthbearer.token.endpoint.url``, ``.client.id``, ``.client.secret``,
``.scope``); aiokafka needs a token provider object instead. This one does what
librdkafka's OIDC method does: the OAuth 2.0 client-credentials grant (client id
and secret in HTTP basic authentication), the token reused until a minute before
it expires.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.parse
import urllib.request

from aiokafka.abc import AbstractTokenProvider

REFRESH_MARGIN_S = 60.0


class OidcTokenProvider(AbstractTokenProvider):
    def __init__(self, url: str, client_id: str, client_secret: str, scope: str = "",
                 extensions: dict[str, str] | None = None, timeout_s: float = 10.0) -> None:
        self.url, self.client_id, self.client_secret, self.scope = url, client_id, client_secret, scope
        self._extensions = extensions or {}
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0
        self.fetches = 0

    async def token(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, self.current)

    def extensions(self) -> dict[str, str]:
        return dict(self._extensions)

    def current(self) -> str:
        """The cached token, or a new one when it is missing or expires within a minute."""
        with self._lock:
            if self._token is None or time.time() >= self._expires - REFRESH_MARGIN_S:
                self._token, lifetime = self._fetch()
                self._expires = time.time() + lifetime
            return self._token

    def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials", **({"scope": self.scope} if self.scope else {})}
        basic = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        request = urllib.request.Request(self.url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                         headers={"Authorization": f"Basic {basic}",
                                                  "Content-Type": "application/x-www-form-urlencoded",
                                                  "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            body = json.loads(response.read())
        self.fetches += 1
        return str(body["access_token"]), float(body.get("expires_in", 3600))


def parse_extensions(text: str) -> dict[str, str]:
    """librdkafka's ``sasl.oauthbearer.extensions``: ``key=value,key2=value2``."""
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = pair.partition("=")
        out[key.strip()] = value.strip()
    return out
