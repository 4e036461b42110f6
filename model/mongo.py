"""MongoDB connections: URI redaction and the embedded SecantusDB server.

Production points ``NEWSLXMERT_MONGO_URI`` (or another variable) at any MongoDB. With no
URI configured, :class:`EmbeddedMongo` starts SecantusDB, a MongoDB-wire-compatible
server, in this process on 127.0.0.1 with its files under the data root.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# Greedy up to the last "@" of the token, so that an unescaped "@" or "/" in a password is
# redacted too.
_CREDENTIALS_IN_TEXT = re.compile(r"(mongodb(?:\+srv)?://)([^\s?#]*)@", re.IGNORECASE)


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its password replaced by ``***`` (the user name is kept).

    The URI is not parsed with urllib, which raises on some malformed hosts and splits an
    unescaped "/" in a password off as the path: everything between the first ":" after the
    scheme and the last "@" before the options counts as the password.
    """
    scheme, separator, rest = uri.partition("://")
    if not separator:
        return uri
    head, query_separator, query = rest.partition("?")
    if "@" not in head:
        return uri
    userinfo, host = head.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{query_separator}{query}"


def redact_text(text: str) -> str:
    """Redact every MongoDB URI credential inside free text, such as an exception message."""

    def _replace(match: re.Match[str]) -> str:
        user = match.group(2).split(":", 1)[0]
        return f"{match.group(1)}{user}:***@"

    return _CREDENTIALS_IN_TEXT.sub(_replace, text)


class EmbeddedMongo:
    """A SecantusDB server in this process, listening on 127.0.0.1 on a free port.

    Use as a context manager; ``uri`` is valid between enter and exit. Data persists in
    ``storage_path`` across restarts.
    """

    def __init__(self, storage_path: Path | str):
        self.storage_path = Path(storage_path)
        self._server = None

    def __enter__(self) -> "EmbeddedMongo":
        from secantus import SecantusDBServer

        self.storage_path.mkdir(parents=True, exist_ok=True)
        self._server = SecantusDBServer(storage_path=str(self.storage_path), host="127.0.0.1", port=0)
        self._server.__enter__()
        logger.info("started embedded SecantusDB at %s with data in %s", self.uri, self.storage_path)
        return self

    @property
    def uri(self) -> str:
        if self._server is None:
            raise RuntimeError("the embedded MongoDB server is not running; use EmbeddedMongo as a context manager")
        return self._server.uri

    def __exit__(self, *exc_info) -> None:
        if self._server is not None:
            self._server.__exit__(*exc_info)
            logger.info("stopped embedded SecantusDB with data in %s", self.storage_path)
            self._server = None
