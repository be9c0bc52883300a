"""The storage service: per-site key/value storage in SQLite, one file per site.

One file per site (rather than one table for all) keeps the sites apart on disk: clearing a
site deletes its files, a corrupt file fails that site's calls only, and a site's usage is
its own database's. Files live in `<profile>/storage/` and are named from the site:

    https://example.co.uk  ->  https_example.co.uk-3f1c0a9be2d4.sqlite

the scheme, "_", the host (cut to 200 characters, so that the name and its "-wal" and
"-shm" companions stay under the 255-byte limit of a file name) and 12 hex digits of the
site's SHA-256. A valid site holds only [a-z0-9.-] in its host (or a bracketed IPv6
address), so the name has no "/" and is never "." or "..": no path traversal; the readable
part alone already tells any two uncut sites apart, and the hash tells apart cut ones.

Each database runs in WAL mode with `synchronous=NORMAL` (a crash of the service loses
nothing, a power cut may lose the last commits, neither corrupts the file) and a busy
timeout, so a file held by another process fails the call after BUSY_TIMEOUT seconds
instead of hanging the service. Usage is kept in the database by triggers, so it cannot
drift from the rows whatever statement changes them; set() checks the quota inside its
write transaction.

The calls block on SQLite: that is fine here, as the service serves one host and nothing
else runs in its loop. Reads for a site that never stored anything create no file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import socket
import sqlite3
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from fos_host.closing import Closing
from fos_host.interfaces.storage import (
    MAX_KEY,
    MAX_VALUE,
    BadKey,
    BadSite,
    QuotaExceeded,
    Storage,
    StorageFailed,
)
from fos_host.ipc.channel import Channel
from fos_host.ipc.interface import Endpoint

log = logging.getLogger(__name__)

DEFAULT_QUOTA = 5 << 20  # bytes per site
BUSY_TIMEOUT = 5.0  # seconds a call waits for a database another process holds
MAX_OPEN = 32  # sites whose connections stay open (each holds 3 fds: db, -wal, -shm)
KEYS_PAGE = 32 * 1024  # bytes of keys in one keys() answer: well inside a 64 KiB message
SCHEMA_VERSION = 1
MAX_HOST_IN_NAME = 200

_SITE = re.compile(r"(https?)://(.+)")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_IPV6 = re.compile(r"\[[0-9a-f:]+\]")

# Usage is the UTF-8 bytes of the keys plus the bytes of the values, kept by triggers.
_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE items (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
CREATE TABLE usage (bytes INTEGER NOT NULL);
INSERT INTO usage VALUES (0);
CREATE TRIGGER items_insert AFTER INSERT ON items BEGIN
    UPDATE usage SET bytes = bytes + length(CAST(NEW.key AS BLOB)) + length(NEW.value);
END;
CREATE TRIGGER items_delete AFTER DELETE ON items BEGIN
    UPDATE usage SET bytes = bytes - length(CAST(OLD.key AS BLOB)) - length(OLD.value);
END;
CREATE TRIGGER items_update AFTER UPDATE ON items BEGIN
    UPDATE usage SET bytes = bytes
        - length(CAST(OLD.key AS BLOB)) - length(OLD.value)
        + length(CAST(NEW.key AS BLOB)) + length(NEW.value);
END;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""


def check_site(site: str) -> tuple[str, str]:
    """(scheme, host) of a site such as "https://example.co.uk"; BadSite if it is not an
    http(s) scheme and a host in the canonical form a URL parser gives (lower case, no
    port, path or trailing dot)."""
    m = _SITE.fullmatch(site)
    if m is None:
        raise BadSite(f"{site[:300]!r} is not a site: expected http(s)://host")
    scheme, host = m.groups()
    if host.startswith("["):
        address = host[1:-1]
        try:  # hex digits and colons only: no zone ("%eth0"), no dotted IPv4 tail
            canonical = ipaddress.IPv6Address(address).compressed if _IPV6.fullmatch(host) else None
        except ValueError:
            canonical = None
        if address != canonical:
            raise BadSite(f"{site[:300]!r}: not an IPv6 address in canonical form ([::1])")
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise BadSite(
            f"{site[:300]!r}: the host must be lower-case letters, digits, '-' and '.' "
            "(at most 253 characters, labels of 1 to 63, IDN in punycode)"
        )
    return scheme, host


def file_name(site: str) -> str:
    """The database file of a site (see the module's docstring)."""
    scheme, host = check_site(site)
    digest = hashlib.sha256(site.encode()).hexdigest()[:12]
    return f"{scheme}_{host[:MAX_HOST_IN_NAME]}-{digest}.sqlite"


def check_key(key: str, what: str = "key", *, empty: bool = False) -> None:
    """BadKey unless `key` has 1 (0 if `empty`) to MAX_KEY characters and no NUL."""
    if not key and not empty:
        raise BadKey(f"an empty {what}")
    if len(key) > MAX_KEY:
        raise BadKey(f"a {what} of {len(key)} characters (at most {MAX_KEY})")
    if "\0" in key:
        raise BadKey(f"a {what} with a NUL character: {key[:40]!r}")


class StorageService(Closing):
    """Implements `Storage` on the files under `<profile>/storage/`. Keeps the connections
    of the MAX_OPEN sites used last open; `close()` closes them all."""

    def __init__(
        self,
        profile: str | os.PathLike[str],
        *,
        quota: int = DEFAULT_QUOTA,
        max_open: int = MAX_OPEN,
    ) -> None:
        if quota < 0 or max_open < 1:
            raise ValueError(f"quota {quota} and max_open {max_open}: want >= 0 and >= 1")
        self.root = Path(profile) / "storage"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.quota = quota
        self.max_open = max_open
        self._open: OrderedDict[str, sqlite3.Connection] = OrderedDict()

    def close(self) -> None:
        while self._open:
            _, conn = self._open.popitem()
            conn.close()

    # -- Storage ---------------------------------------------------------------------------

    def get(self, site: str, key: str) -> bytes | None:
        check_key(key)
        with self._database(site, create=False) as db:
            if db is None:
                return None
            row = db.execute("SELECT value FROM items WHERE key = ?", (key,)).fetchone()
            return None if row is None else row[0]

    def set(self, site: str, key: str, value: bytes) -> None:
        check_site(site)  # a bad site is BadSite, whatever the value
        check_key(key)
        if len(value) > MAX_VALUE:
            raise QuotaExceeded(
                f"{site}: a value of {len(value)} bytes is over the limit of {MAX_VALUE} "
                "bytes per value"
            )
        size = len(key.encode()) + len(value)
        with self._database(site, create=True) as db:
            assert db is not None  # created if missing
            with _transaction(db):
                (used,) = db.execute("SELECT bytes FROM usage").fetchone()
                row = db.execute(
                    "SELECT length(CAST(key AS BLOB)) + length(value) FROM items WHERE key = ?",
                    (key,),
                ).fetchone()
                after = used - (row[0] if row else 0) + size
                if after > self.quota:
                    raise QuotaExceeded(
                        f"{site}: storing {size} bytes under this key would bring the site to "
                        f"{after} bytes, over its quota of {self.quota} bytes ({used} in use)"
                    )
                db.execute(
                    "INSERT INTO items (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    def delete(self, site: str, key: str) -> bool:
        check_key(key)
        with self._database(site, create=False) as db:
            if db is None:
                return False
            return db.execute("DELETE FROM items WHERE key = ?", (key,)).rowcount > 0

    def keys(self, site: str, prefix: str, after: str) -> list[str]:
        check_key(prefix, "prefix", empty=True)
        check_key(after, "starting point", empty=True)
        with self._database(site, create=False) as db:
            if db is None:
                return []
            rows = db.execute(
                "SELECT key FROM items WHERE key >= ? AND key > ? ORDER BY key", (prefix, after)
            )
            page: list[str] = []
            room = KEYS_PAGE
            for (key,) in rows:  # in order from the prefix on: stop at the first without it
                room -= len(key.encode()) + 5  # + msgpack's largest string header
                if not key.startswith(prefix) or (room < 0 and page):
                    break
                page.append(key)
            return page

    def usage(self, site: str) -> int:
        with self._database(site, create=False) as db:
            if db is None:
                return 0
            (used,) = db.execute("SELECT bytes FROM usage").fetchone()
            return int(used)

    def clear(self, site: str) -> None:
        path = self.root / file_name(site)
        conn = self._open.pop(site, None)
        if conn is not None:
            conn.close()
        for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            try:
                name.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StorageFailed(f"{site}: cannot remove {name}: {e.strerror}") from e
        log.info("%s: storage cleared", site)

    # -- databases -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _database(self, site: str, *, create: bool) -> Iterator[sqlite3.Connection | None]:
        """The site's open database (None if it has none and `create` is false). An SQLite
        error closes the connection (the next call opens the file afresh) and becomes a
        StorageFailed that names the file."""
        path = self.root / file_name(site)
        try:
            conn = self._open.get(site)
            if conn is not None:
                self._open.move_to_end(site)
            elif create or path.exists():
                conn = self._connect(site, path)
            yield conn
        except sqlite3.Error as e:
            stale = self._open.pop(site, None)
            if stale is not None:
                stale.close()
            log.error("%s: %s: %s", site, path, e)
            raise StorageFailed(
                f"{site}: the database {path} cannot be used: {e}; if it is corrupt, move it "
                "away or clear the site's data to start the site afresh"
            ) from e

    def _connect(self, site: str, path: Path) -> sqlite3.Connection:
        """Open (or create) a site's database, set it up, and keep it open (closing the
        one used longest ago if MAX_OPEN are)."""
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal mode is {mode!r}, WAL was refused")
            conn.execute("PRAGMA synchronous = NORMAL")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == 0:  # new: the script is one transaction (BEGIN ... COMMIT)
                conn.executescript(_SCHEMA)
            elif version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version}, this fos-host knows {SCHEMA_VERSION}"
                )
        except BaseException:
            conn.close()
            raise
        if len(self._open) >= self.max_open:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        self._open[site] = conn
        return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction: BEGIN IMMEDIATE takes the write lock at once (waiting at most
    the busy timeout), so what is read inside it still holds when the writes commit."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # a corrupt file may refuse even this
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def main(fd: int, profile: str | os.PathLike[str], quota: int = DEFAULT_QUOTA) -> None:
    """Serve `Storage` on the SEQPACKET socket `fd` (taken over) until the host closes it,
    with the site databases under `<profile>/storage/`."""

    async def serve() -> None:
        with StorageService(profile, quota=quota) as service:
            channel = Channel(socket.socket(fileno=fd), name="storage")
            endpoint = Endpoint(channel, {Storage: service})
            await endpoint.connect()
            closed = await endpoint.wait_closed()
            log.info("storage service: %s", closed.reason)

    asyncio.run(serve())


def run(profile: str, quota: str) -> int:
    """The service sandbox's entry (`fos_host.services.storage:run`): serve on fd 3."""
    main(3, profile, int(quota))
    return 0
