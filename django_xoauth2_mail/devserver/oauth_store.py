"""What the development OAuth2 server remembers: clients, codes and tokens, and its state file.

One :class:`OAuth2Store` per server holds the records behind a lock (the HTTP server
answers from many threads) and, when given a state file, writes them all after each
change, so clients and tokens survive a restart. Tokens are kept in clear: development only.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["AccessToken", "Client", "Code", "OAuth2Store", "RefreshToken"]


@dataclass
class Client:
    secret: str | None  # None: a public client (PKCE only), as msal's PublicClientApplication
    redirect_uris: list[str] | None  # None: any loopback redirect, as Google allows


@dataclass
class Code:
    client_id: str
    redirect_uri: str
    email: str
    scope: str
    code_challenge: str
    nonce: str | None
    expires_at: float


@dataclass
class RefreshToken:
    client_id: str | None  # None: issued by issue_tokens() for any client
    email: str
    scope: str
    grant_id: str  # shared by every token of one consent, so revocation reaches them all


@dataclass
class AccessToken:
    client_id: str | None
    email: str | None  # None: a client_credentials (application) token
    scope: str
    expires_at: float
    grant_id: str | None


# The state file's tables and the record each holds.
_TABLES: dict[str, type[Any]] = {
    "clients": Client,
    "codes": Code,
    "refresh_tokens": RefreshToken,
    "access_tokens": AccessToken,
}


class OAuth2Store:
    """The server's records; ``state_file`` (if any) is read now and rewritten on change."""

    def __init__(self, state_file: Path | None) -> None:
        self.state_file = state_file
        # Re-entrant: issuing tokens saves the state while a grant already holds the lock.
        self.lock = threading.RLock()
        self.clients: dict[str, Client] = {}
        self.codes: dict[str, Code] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        if state_file is not None and state_file.exists():
            self.load(state_file)

    def issue(
        self,
        client_id: str | None,
        email: str | None,
        scope: str,
        grant_id: str | None,
        with_refresh: bool,
        *,
        lifetime: int,
        length: int,
    ) -> dict[str, Any]:
        """A token response body; the refresh token only for a person's grant."""
        access = secrets.token_urlsafe(length)[:length]
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }
        with self.lock:
            self.access_tokens[access] = AccessToken(
                client_id, email, scope, time.time() + lifetime, grant_id
            )
            if with_refresh and email is not None and grant_id is not None:
                body["refresh_token"] = secrets.token_urlsafe(32)
                self.refresh_tokens[body["refresh_token"]] = RefreshToken(
                    client_id, email, scope, grant_id
                )
            self.save()
        return body

    def revoke(self, token: str) -> bool:
        """Revoke a refresh token with every access token of its grant, or one access token."""
        with self.lock:
            refresh = self.refresh_tokens.pop(token, None)
            access = self.access_tokens.pop(token, None)
            if refresh is not None:
                for key, record in list(self.access_tokens.items()):
                    if record.grant_id == refresh.grant_id:
                        del self.access_tokens[key]
            self.save()
            return refresh is not None or access is not None

    def expire_access_tokens(self) -> None:
        with self.lock:
            past = time.time() - 1
            for record in self.access_tokens.values():
                record.expires_at = min(record.expires_at, past)
            self.save()

    def validate_access_token(self, email: str, token: str) -> bool:
        with self.lock:
            record = self.access_tokens.get(token)
            if record is None or record.expires_at <= time.time():
                return False
            return record.email is None or record.email.lower() == email.lower()

    def _tables(self) -> dict[str, dict[str, Any]]:
        return {
            "clients": self.clients,
            "codes": self.codes,
            "refresh_tokens": self.refresh_tokens,
            "access_tokens": self.access_tokens,
        }

    def save(self) -> None:
        if self.state_file is None:
            return
        with self.lock:
            state: dict[str, Any] = {"version": 1}
            for name, table in self._tables().items():
                state[name] = {key: asdict(record) for key, record in table.items()}
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target and rename: a crash never leaves half a file.
            fd, temporary = tempfile.mkstemp(prefix=".oauth2-state-", dir=self.state_file.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                json.dump(state, stream, indent=1)
            os.replace(temporary, self.state_file)

    def load(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            for name, table in self._tables().items():
                records = state[name].items()
                table.update((key, _TABLES[name](**fields)) for key, fields in records)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"Cannot read the OAuth2 development server state file {path}: {error!r}. "
                "Delete it to start with no clients and tokens."
            ) from error
