"""The attacks of fos_host/probe.py that the sandbox tests (root and rootless) expect, the
host-side targets they aim at, and the check of the probe's verdicts."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator

EXPECTED_ATTACKS = {
    "socket_inet",
    "socket_inet6",
    "socket_netlink",
    "socket_packet",
    "socket_inet_64bit",
    "connect_host_loopback",
    "connect_host_abstract",
    "read_secret",
    "read_root",
    "write_root",
    "write_etc",
    "write_usr",
    "see_host_pids",
    "ptrace_parent",
    "setuid",
    "mount",
    "unshare",
    "clone_newuser",
    "chroot",
    "keyctl",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "personality",
    "tiocsti",
    "raise_rlimit",
}

# Killed by seccomp, not stopped by luck .
SECCOMP_KILLED = (
    "socket_inet",
    "socket_inet_64bit",
    "ptrace_parent",
    "mount",
    "unshare",
    "bpf",
    "keyctl",
    "io_uring_setup",
    "userfaultfd",
    "perf_event_open",
    "tiocsti",
    "setuid",
    "chroot",
    "clone_newuser",
    "personality",
)
# Stopped without any seccomp filter: namespaces, mounts and dropped capabilities.
WITHOUT_SECCOMP = (
    "connect_host_loopback",
    "connect_host_abstract",
    "read_secret",
    "read_root",
    "write_root",
    "write_etc",
    "write_usr",
    "see_host_pids",
    "mount",
    "chroot",
    "setuid",
    "raise_rlimit",
)


@contextlib.contextmanager
def host_targets(secret: str, name: str) -> Iterator[dict[str, str]]:
    """The probe's "attack" arguments: the secret file (made by the caller), a TCP listener on
    the host's loopback and a host abstract unix socket called `name`."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        abstract.bind("\0" + f"{name}-{os.getpid()}")
        abstract.listen()
        port = str(tcp.getsockname()[1])
        yield {"secret": secret, "port": port, "abstract": f"{name}-{os.getpid()}"}
    finally:
        tcp.close()
        abstract.close()


def assert_attacks_failed(out: str, *, seccomp: bool = True) -> None:
    """The probe's verdicts: every attack it made was blocked, and with seccomp the dangerous
    calls were killed by it (not stopped by luck)."""
    results = {r["attack"]: r for r in json.loads(out)}
    worked = {n: r["how"] for n, r in results.items() if not r["blocked"]}
    assert not worked, f"attacks that worked: {worked}"
    if seccomp:
        assert set(results) == EXPECTED_ATTACKS
        for name in SECCOMP_KILLED:
            assert results[name]["how"] == "killed by SIGSYS", (name, results[name])
    else:
        assert set(results) == set(WITHOUT_SECCOMP)
