"""The storage service over a real channel: the host's proxy on one end of a
`Channel.pair()`, `StorageService` behind an Endpoint on the other (and once `main()` in a
process of its own). Every test checks that the fds it opened are gone at the end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fdcheck import run

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
from fos_host.services import storage as service_module
from fos_host.services.storage import KEYS_PAGE, StorageService, file_name

T = TypeVar("T")
MiB = 1 << 20
A, B = "https://example.co.uk", "https://other.example"


pytestmark = pytest.mark.usefixtures("no_fd_leak")


@contextlib.asynccontextmanager
async def serving(profile: Path, **kw: Any) -> AsyncIterator[tuple[Storage, StorageService]]:
    """The host's proxy to a StorageService on `profile`, and the service itself."""
    host_end, service_end = Channel.pair(names=("host", "storage"))
    with StorageService(profile, **kw) as service:
        server = Endpoint(service_end, {Storage: service})
        client = Endpoint(host_end)
        try:
            await asyncio.gather(server.connect(), client.connect())
            yield client.proxy(Storage), service
        finally:
            client.close()
            server.close()


async def all_keys(storage: Storage, site: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    while page := await storage.keys(site, prefix, keys[-1] if keys else ""):
        keys += page
    return keys


def files(profile: Path) -> list[str]:
    return sorted(p.name for p in (profile / "storage").iterdir())


# -- round trips -----------------------------------------------------------------------------


def test_set_get_delete_keys_usage_clear(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as (storage, _):
            assert await storage.get(A, "k") is None
            assert await storage.usage(A) == 0
            assert files(tmp_path) == []  # reads make no file
            await storage.set(A, "k", b"value")
            await storage.set(A, "ké", b"")  # usage counts UTF-8 bytes: 3 for the key
            assert await storage.get(A, "k") == b"value"
            assert await storage.get(A, "ké") == b""
            assert await storage.usage(A) == 1 + 5 + 3
            await storage.set(A, "k", b"v2")  # a replaced value counts once
            assert await storage.get(A, "k") == b"v2"
            assert await storage.usage(A) == 1 + 2 + 3
            assert await storage.keys(A, "", "") == ["k", "ké"]
            assert await storage.delete(A, "k") is True
            assert await storage.delete(A, "k") is False
            assert await storage.get(A, "k") is None
            assert await storage.usage(A) == 3
            await storage.clear(A)
            assert files(tmp_path) == []  # the files are gone, not just the rows
            assert await storage.usage(A) == 0
            assert await storage.keys(A, "", "") == []
            await storage.clear(A)  # clearing nothing is fine

    run(go())


def test_keys_by_prefix_in_code_point_order_and_in_pages(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path, quota=MiB) as (storage, _):
            for key in ["b", "a", "ab", "a\U0001f600", "aé", "a%", "a_", "A"]:
                await storage.set(A, key, b"")
            assert await all_keys(storage, A) == [
                "A",
                "a",
                "a%",
                "a_",
                "ab",
                "aé",
                "a\U0001f600",
                "b",
            ]
            assert await all_keys(storage, A, "a") == ["a", "a%", "a_", "ab", "aé", "a\U0001f600"]
            assert await all_keys(storage, A, "a_") == ["a_"]  # no LIKE wildcards
            assert await all_keys(storage, A, "c") == []
            assert await storage.keys(A, "a", "a_") == ["ab", "aé", "a\U0001f600"]
            long = sorted(f"p{i:04}" + "x" * 995 for i in range(100))  # ~100 KB of keys
            for key in long:
                await storage.set(A, key, b"")
            first = await storage.keys(A, "p", "")
            assert 1 < len(first) < 100 and sum(map(len, first)) <= KEYS_PAGE
            assert await all_keys(storage, A, "p") == long

    run(go())


def test_sites_are_isolated(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as (storage, _):
            await storage.set(A, "key", b"from a")
            await storage.set(B, "key", b"from b")
            await storage.set("http://example.co.uk", "key", b"http is another site")
            assert await storage.get(A, "key") == b"from a"
            assert await storage.get(B, "key") == b"from b"
            assert await storage.keys(B, "", "") == ["key"]
            await storage.clear(A)
            assert await storage.get(A, "key") is None
            assert await storage.get(B, "key") == b"from b"
            assert await storage.get("http://example.co.uk", "key") == b"http is another site"

    run(go())


def test_file_names_are_readable_unique_and_safe() -> None:
    name = file_name(A)
    assert name.startswith("https_example.co.uk-") and name.endswith(".sqlite")
    assert file_name("http://example.co.uk") != name
    assert file_name("https://[2001:db8::1]").startswith("https_[2001:db8::1]-")
    long = (
        "https://"
        + ".".join(["a" * 63] * 3)
        + ".abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghi"
    )
    cut = long[:-1] + "j"  # the same first 200 characters of the host
    assert len(file_name(long).encode()) + len("-wal") <= 255
    assert file_name(long) != file_name(cut)
    assert all("/" not in file_name(s) for s in (A, long, "http://localhost"))


# -- limits and refusals ---------------------------------------------------------------------


def test_quota_is_enforced_and_a_refused_set_changes_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path, quota=100) as (storage, _):
            await storage.set(A, "a", b"x" * 59)  # 60 bytes
            await storage.set(A, "b", b"y" * 39)  # 100: exactly the quota
            with pytest.raises(QuotaExceeded) as e:
                await storage.set(A, "a", b"z" * 60)  # 61 for this key: 101
            assert A in str(e.value) and "quota of 100 bytes" in str(e.value)
            assert "storing 61 bytes" in str(e.value)
            assert await storage.get(A, "a") == b"x" * 59
            assert await storage.usage(A) == 100
            with pytest.raises(QuotaExceeded):
                await storage.set(A, "c", b"")
            assert await storage.keys(A, "", "") == ["a", "b"]
            await storage.set(A, "a", b"z" * 9)  # smaller: the old value no longer counts
            await storage.set(A, "c", b"w" * 49)
            assert await storage.usage(A) == 100
            await storage.set(B, "a", b"x" * 99)  # the quota is per site

    run(go())


def test_values_over_the_limit_are_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path, quota=20 * MiB) as (storage, _):
            with pytest.raises(QuotaExceeded, match=f"limit of {MAX_VALUE} bytes per value"):
                await storage.set(A, "big", bytes(MAX_VALUE + 1))
            assert files(tmp_path) == []

    run(go())


def test_bad_keys_are_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as (storage, _):
            for key in ["", "k" * (MAX_KEY + 1), "a\0b"]:
                with pytest.raises(BadKey):
                    await storage.set(A, key, b"v")
                with pytest.raises(BadKey):
                    await storage.get(A, key)
                with pytest.raises(BadKey):
                    await storage.delete(A, key)
            with pytest.raises(BadKey, match="prefix"):
                await storage.keys(A, "\0", "")
            with pytest.raises(BadKey, match="starting point"):
                await storage.keys(A, "", "k" * (MAX_KEY + 1))
            await storage.set(A, "k" * MAX_KEY, b"v")
            assert await storage.keys(A, "", "") == ["k" * MAX_KEY]

    run(go())


BAD_SITES = [
    "",
    "example.com",
    "ftp://example.com",
    "https://",
    "https://Example.com",
    "HTTPS://example.com",
    "https://example.com/",
    "https://example.com:443",
    "https://example.com.",
    "https://user@example.com",
    "https://exa mple.com",
    "https://..",
    "https://../../etc",
    "https://a..b",
    "https://-a.com",
    "https://" + "a" * 64 + ".com",
    "https://[::1%eth0]",
    "https://[0:0::1]",
    "https://[::ffff:1.2.3.4]",
    "https://[nonsense]",
]


def test_bad_sites_are_refused_and_make_no_file(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as (storage, _):
            for site in BAD_SITES:
                with pytest.raises(BadSite):
                    await storage.set(site, "k", b"v")
                with pytest.raises(BadSite):
                    await storage.get(site, "k")
                with pytest.raises(BadSite):
                    await storage.clear(site)
            assert files(tmp_path) == []
            for site in ["http://localhost", "https://[::1]", "https://xn--bcher-kva.example"]:
                await storage.set(site, "k", b"v")
                assert await storage.get(site, "k") == b"v"

    run(go())


# -- the files -------------------------------------------------------------------------------


def test_wal_mode_and_synchronous_normal(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as (storage, service):
            await storage.set(A, "k", b"v")
            path = tmp_path / "storage" / file_name(A)
            assert Path(f"{path}-wal").exists()
            assert service._open[A].execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        with contextlib.closing(sqlite3.connect(path)) as db:  # WAL is kept in the file
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    run(go())


def test_data_persists_across_a_restart(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as (storage, _):
            await storage.set(A, "k", b"kept")
            await storage.set(B, "k", b"also kept")
        assert files(tmp_path) == sorted([file_name(A), file_name(B)])  # closed: WAL merged
        async with serving(tmp_path) as (storage, _):
            assert await storage.get(A, "k") == b"kept"
            assert await storage.get(B, "k") == b"also kept"
            assert await storage.usage(A) == 1 + 4

    run(go())


def test_a_corrupt_file_fails_its_site_only(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as (storage, _):
            await storage.set(B, "k", b"fine")
            path = tmp_path / "storage" / file_name(A)
            path.write_bytes(b"this is not a database, " * 100)
            for call in (
                storage.get(A, "k"),
                storage.set(A, "k", b"v"),
                storage.usage(A),
                storage.keys(A, "", ""),
            ):
                with pytest.raises(StorageFailed) as e:
                    await call
                assert str(path) in str(e.value) and "not a database" in str(e.value)
            assert await storage.get(B, "k") == b"fine"
            await storage.set(B, "k2", b"still fine")
            await storage.clear(A)  # the way out
            await storage.set(A, "k", b"afresh")
            assert await storage.get(A, "k") == b"afresh"

    run(go())


def test_a_database_held_by_another_process_fails_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "BUSY_TIMEOUT", 0.2)

    async def go() -> None:
        async with serving(tmp_path) as (storage, _):
            await storage.set(A, "k", b"v")
            path = tmp_path / "storage" / file_name(A)
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
                other.execute("BEGIN EXCLUSIVE")
                with pytest.raises(StorageFailed, match="locked"):
                    await storage.set(A, "k", b"w")
                other.execute("ROLLBACK")
            await storage.set(A, "k", b"w")  # reopened once the lock is gone
            assert await storage.get(A, "k") == b"w"

    run(go())


def test_a_big_value_goes_through(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as (storage, _):
            big = os.urandom(2 * MiB)
            await storage.set(A, "big", big)
            assert await storage.get(A, "big") == big
            assert await storage.usage(A) == 3 + 2 * MiB

    run(go())


def test_open_connections_are_capped(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path, max_open=2) as (storage, service):
            sites = [f"https://site{i}.example" for i in range(5)]
            for site in sites:
                await storage.set(site, "k", site.encode())
                assert len(service._open) <= 2
            for site in sites:  # the closed ones reopen
                assert await storage.get(site, "k") == site.encode()
            assert list(service._open) == sites[-2:]

    run(go())


def test_main_serves_until_the_host_closes(tmp_path: Path) -> None:
    host_sock, service_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = service_sock.fileno()
    with service_sock:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from fos_host.services.storage import main; main({fd}, {str(tmp_path)!r})",
            ],
            pass_fds=[fd],
        )

    async def go() -> None:
        host = Endpoint(Channel(host_sock, name="host"))
        try:
            await host.connect()
            storage = host.proxy(Storage)
            await storage.set(A, "k", b"from another process")
            assert await storage.get(A, "k") == b"from another process"
        finally:
            host.close()

    try:
        run(go())
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert files(tmp_path) == [file_name(A)]
