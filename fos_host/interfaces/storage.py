"""host ↔ storage service: per-site key/value storage (`fos_host.services.storage`).

Only the host calls it, on behalf of a renderer whose site lock it has checked, so every
method names the site first ("https://example.co.uk": scheme and host, lower case, no port
or path). The service trusts the host to have checked the lock, and still refuses a
malformed site or key, so a host bug cannot turn into a stray file.

Keys are strings of 1 to 1024 characters without NUL; values are byte strings of at most
10 MiB (big ones cross in shared memory, which the IPC layer does by itself). Each site has
a quota, counted as the UTF-8 bytes of its keys plus the bytes of its values.
"""

from __future__ import annotations

from fos_host.ipc.interface import Interface, RemoteError, method

MAX_KEY = 1024  # characters
MAX_VALUE = 10 << 20  # bytes


class BadSite(RemoteError):
    """The site is not "http(s)://host" in canonical (lower-case) form."""


class BadKey(RemoteError):
    """A key (or a prefix) that is empty, longer than 1024 characters, or holds a NUL."""


class QuotaExceeded(RemoteError):
    """A set() that would take the site over its quota, or a value over 10 MiB; nothing
    was changed."""


class StorageFailed(RemoteError):
    """The site's database cannot be used (corrupt, locked by another process, made by a
    newer version); the message names the file. Other sites are not affected."""


class Storage(Interface, version=1):
    errors = (BadSite, BadKey, QuotaExceeded, StorageFailed)

    @method(0)
    async def get(self, site: str, key: str) -> bytes | None:
        """The value stored under `key`, or None."""
        ...

    @method(1)
    async def set(self, site: str, key: str, value: bytes) -> None:
        """Store `value` under `key`, replacing what was there (all or nothing)."""
        ...

    @method(2)
    async def delete(self, site: str, key: str) -> bool:
        """Remove `key`; whether it was there."""
        ...

    @method(3)
    async def keys(self, site: str, prefix: str, after: str) -> list[str]:
        """One page of the keys that start with `prefix` ("" for all), in code point order,
        those after `after` ("" to start at the beginning). A page holds as many keys as fit
        one message, so list them all with

            after = ""
            while page := await storage.keys(site, prefix, after):
                ...
                after = page[-1]
        """
        ...

    @method(4)
    async def usage(self, site: str) -> int:
        """The bytes the site's keys and values count against its quota."""
        ...

    @method(5)
    async def clear(self, site: str) -> None:
        """Remove everything the site stored, files and all (also the way out of a corrupt
        database)."""
        ...
