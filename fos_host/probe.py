"""The in-sandbox probe: one small program with subcommands, run inside a sandbox by the
tests, the demo and the benchmark (as crun's test `init`).

    python -m fos_host.probe report            JSON: what the process can see and do
    python -m fos_host.probe attack [NAME…]    each attack in a forked child; JSON results
    python -m fos_host.probe alloc MB          touch MB MiB of fresh memory, then exit 0
    python -m fos_host.probe fork N            try to keep N children alive; print how many
    python -m fos_host.probe byte              write one byte to stdout and exit (benchmark)
    python -m fos_host.probe idle              write one byte, then sleep until killed
    python -m fos_host.probe grow              write one byte; for each line "MB" on stdin touch
                                               MB MiB more (kept) and write "+"; then sleep
    python -m fos_host.probe family N          fork N children that sleep, write one byte, sleep
    python -m fos_host.probe find-in-memory PREFIX LEN SHA256
                                               how many LEN-byte runs of its own memory start
                                               with PREFIX and hash to SHA256

Kept to the standard library and ctypes: it runs under the renderer seccomp profile.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 syscall numbers
NR = {
    "socket": 41,
    "ptrace": 101,
    "setuid": 105,
    "chroot": 161,
    "mount": 165,
    "unshare": 272,
    "keyctl": 250,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "clone": 56,
    "personality": 135,
}
TIOCSTI = 0x5412
CLONE_NEWUSER = 0x10000000


def _sys(name: str, *args: int) -> None:
    """Make a raw syscall; raise OSError on failure (seccomp may kill us instead)."""
    ret = _libc.syscall(NR[name], *[ctypes.c_long(a) for a in args])
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def _status() -> dict[str, str]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return f"<{errno.errorcode.get(e.errno or 0, e.errno)}>"


def _open_fds() -> list[int]:
    """Open fds, without the one that listed them (closed again by then)."""
    out = []
    for n in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(n))
            out.append(int(n))
        except OSError:
            pass
    return sorted(out)


def report() -> dict[str, object]:
    st = _status()
    mounts = [line.split()[1] for line in _read("/proc/self/mounts").splitlines()]
    ifaces = [ln.split(":")[0].strip() for ln in _read("/proc/net/dev").splitlines()[2:]]
    return {
        "pid": os.getpid(),
        "visible_pids": _pids(),
        "uid": st["Uid"].split()[0],
        "uid_map": _read("/proc/self/uid_map").split(),
        "gid_map": _read("/proc/self/gid_map").split(),
        "CapEff": st["CapEff"],
        "CapPrm": st["CapPrm"],
        "CapBnd": st["CapBnd"],
        "CapAmb": st["CapAmb"],
        "CapInh": st["CapInh"],
        "NoNewPrivs": st["NoNewPrivs"],
        "Seccomp": st["Seccomp"],
        "hostname": socket.gethostname(),
        "interfaces": ifaces,
        "mounts": mounts,
        "fds": _open_fds(),
        "environ": sorted(os.environ),
        "cgroup": _read("/proc/self/cgroup").strip().splitlines(),
        "rlimit_core": resource.getrlimit(resource.RLIMIT_CORE),
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "sid_is_self": os.getsid(0) == os.getpid(),
        "writes_bytecode": not sys.dont_write_bytecode,
    }


def _connect_tcp(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def _connect_abstract(name: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect("\0" + name)


def _write(path: str) -> None:
    with open(path, "w") as f:
        f.write("owned")


def _ppid(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return -1


def _see_host_pids() -> None:
    """A pid namespace of our own has exactly one process without a parent in it: its pid 1.
    Seeing the host's would show its init and kthreadd (both PPid 0) and many more."""
    pids = _pids()
    roots = [p for p in pids if _ppid(p) == 0]
    if roots != [1] or len(pids) > 32:
        return  # host processes visible: the attack worked
    raise OSError(errno.ESRCH, f"only the sandbox's own processes are visible: {pids}")


def _read_root() -> None:
    """List the host's /root: inside, /root may exist only as the path to a read-only
    runtime bind (e.g. an interpreter under /root/.pyenv); anything else is a leak."""
    mounts = [line.split()[1] for line in _read("/proc/self/mounts").splitlines()]
    leading = {m.split("/")[2] for m in mounts if m.startswith("/root/")}
    leaked = set(os.listdir("/root")) - leading
    if not leaked:
        raise OSError(errno.ENOENT, f"/root holds only runtime mount points {sorted(leading)}")


def _raise_rlimit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1))


def _tiocsti() -> None:
    import fcntl

    fcntl.ioctl(0, TIOCSTI, b"x")


def attacks(args: dict[str, str]) -> dict[str, Callable[[], object]]:
    secret = args.get("secret", "/nonexistent-secret")
    port = int(args.get("port", "1"))
    abstract = args.get("abstract", "fos-test-none")
    return {
        "socket_inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        "socket_inet6": lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM),
        "socket_netlink": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0),
        "socket_packet": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0),
        "socket_inet_64bit": lambda: _sys("socket", 0x1_00000002, 1, 0),
        "connect_host_loopback": lambda: _connect_tcp(port),
        "connect_host_abstract": lambda: _connect_abstract(abstract),
        "read_secret": lambda: _read_strict(secret),
        "read_root": _read_root,
        "write_root": lambda: _write("/owned"),
        "write_etc": lambda: _write("/etc/owned"),
        "write_usr": lambda: _write("/usr/owned"),
        "see_host_pids": _see_host_pids,
        "ptrace_parent": lambda: _sys("ptrace", 16, os.getppid() or 1, 0, 0),  # PTRACE_ATTACH
        "setuid": lambda: _sys("setuid", 1000),
        "mount": lambda: _sys("mount", 0, 0, 0, 0, 0),
        "unshare": lambda: _sys("unshare", CLONE_NEWUSER),
        "clone_newuser": lambda: _sys("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0),
        "chroot": lambda: _sys("chroot", 0),
        "keyctl": lambda: _sys("keyctl", 0, 0, 0, 0, 0),
        "bpf": lambda: _sys("bpf", 0, 0, 0),
        "perf_event_open": lambda: _sys("perf_event_open", 0, 0, -1, -1, 0),
        "userfaultfd": lambda: _sys("userfaultfd", 0),
        "io_uring_setup": lambda: _sys("io_uring_setup", 1, 0),
        "personality": lambda: _sys("personality", 0x0040000),  # ADDR_NO_RANDOMIZE
        "tiocsti": _tiocsti,
        "raise_rlimit": _raise_rlimit,
    }


def _read_strict(path: str) -> str:
    with open(path) as f:
        return f.read()


def run_attack(name: str, fn: Callable[[], object]) -> dict[str, object]:
    """Run one attack in a forked child, so a seccomp kill ends only that child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            out = {"blocked": False, "how": "succeeded"}
        except OSError as e:
            out = {"blocked": True, "how": errno.errorcode.get(e.errno or 0, str(e))}
        except Exception as e:
            out = {"blocked": True, "how": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        res: dict[str, object] = {"blocked": True, "how": f"killed by {sig}"}
    else:
        res = json.loads(data)
    return {"attack": name, **res}


def alloc(mb: int) -> list[bytearray]:
    chunks = []
    for _ in range(mb):
        chunks.append(bytearray(1 << 20))  # calloc'd: touch every page
        chunk = chunks[-1]
        for i in range(0, len(chunk), 4096):
            chunk[i] = 1
    return chunks


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def grow() -> None:
    """Memory on demand (the cgroup tests squeeze it): each line "MB" on stdin touches MB MiB
    more, kept until the process ends; "+" says it is done. At the end of stdin: sleep."""
    kept: list[bytearray] = []
    os.write(1, b"!")
    while line := sys.stdin.readline():
        kept += alloc(int(line))
        os.write(1, b"+")
    sleep_forever()


def family(n: int) -> None:
    """N children that stay (sleeping) with the process; one byte once they all exist."""
    for _ in range(n):
        if os.fork() == 0:
            sleep_forever()
    os.write(1, b"!")
    sleep_forever()


def fork_many(n: int) -> int:
    kids = []
    for _ in range(n):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return len(kids)


def serve_ipc(fd: int) -> None:
    """Serve the `Probe` interface on the SEQPACKET socket `fd` until the host closes it."""
    import asyncio

    from fos_host.interfaces.probe import Probe, ProbeFailed
    from fos_host.ipc.channel import Channel
    from fos_host.ipc.interface import Endpoint
    from fos_host.ipc.shm import seal_bytes
    from fos_host.ipc.wire import EventFd, Memfd, Socket

    class Service:
        def echo(self, data: bytes) -> bytes:
            return data

        def read_memfd(self, memfd: Memfd) -> bytes:
            with memfd:
                size = os.fstat(memfd.fd).st_size
                return os.pread(memfd.fd, size, 0)

        def sealed(self, data: bytes) -> Memfd:
            return Memfd(seal_bytes(data, "fos-probe"))

        def send_on(self, sock: Socket, data: bytes) -> int:
            with sock:
                try:
                    return os.write(sock.fd, data)
                except OSError as e:
                    raise ProbeFailed(f"write: {e.strerror}") from e

        def read_eventfd(self, eventfd: EventFd) -> int:
            with eventfd:
                return os.eventfd_read(eventfd.fd)

        def exit_now(self, code: int) -> None:
            os._exit(code)

        def identity(self) -> list[int]:
            return [os.getpid(), os.getuid()]

    async def run() -> None:
        channel = Channel(socket.socket(fileno=fd), name="probe")
        endpoint = Endpoint(channel, {Probe: Service()})
        await endpoint.connect()
        await endpoint.wait_closed()

    asyncio.run(run())


def hostile_renderer(*argv: str) -> int:
    """A compromised renderer, for the host's tests (`HostConfig.renderer_entry`): the real
    renderer, except that the page's localStorage obeys commands, as an exploited renderer
    would. `local_get` of "forge-storage:ORIGIN|KEY" asks the host for another origin's
    storage, of "forge-fetch:URL" fetches any URL; `local_set("alloc", b"MB")` allocates
    MB MiB (an out-of-memory kill under the renderer's limit)."""
    import asyncio

    from fos_host.renderer.main import CHANNEL_FD, RendererImpl, first_view, read_body, serve

    class Hostile(RendererImpl):
        async def local_get(self, key: str) -> bytes | None:
            command, _, arg = key.partition(":")
            if command == "forge-storage":
                origin, _, name = arg.partition("|")
                return await self.host().storage_get(origin, name)
            if command == "forge-fetch":
                fetched = await self.host().fetch(arg)
                return read_body(fetched.body, fetched.length)
            return await super().local_get(key)

        async def local_set(self, key: str, value: bytes) -> None:
            if key == "alloc":
                self.hog = alloc(int(value))
                return
            await super().local_set(key, value)

    asyncio.run(serve(CHANNEL_FD, Hostile, first_view(argv)))
    return 0


def find_in_memory(prefix: bytes, length: int, digest: str) -> int:
    """How many `length`-byte runs of this process's own heap and anonymous memory start with
    `prefix` and have the sha256 `digest`: whether a secret is here, without ever holding the
    secret. Read directly, as code running here could (a sandbox is not dumpable, so
    /proc/self/mem is refused); file mappings are left out (one past its file's end faults)."""
    found = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if not fields[1].startswith("r") or path not in ("", "[heap]", "[stack]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            data = ctypes.string_at(start, end - start)
            at = data.find(prefix)
            while at >= 0:
                if hashlib.sha256(data[at : at + length]).hexdigest() == digest:
                    found += 1
                at = data.find(prefix, at + 1)
    return found


def main(*argv: str) -> int:
    args = list(argv) or sys.argv[1:]
    cmd, rest = (args[0], args[1:]) if args else ("report", [])
    out = sys.stdout
    if cmd == "report":
        out.write(json.dumps(report()) + "\n")
    elif cmd == "attack":
        opts = dict(a.split("=", 1) for a in rest if "=" in a)
        names = [a for a in rest if "=" not in a]
        table = attacks(opts)
        results = [run_attack(n, table[n]) for n in (names or list(table))]
        out.write(json.dumps(results) + "\n")
    elif cmd == "alloc":
        alloc(int(rest[0]))
        out.write("allocated\n")
    elif cmd == "fork":
        out.write(f"{fork_many(int(rest[0]))}\n")
    elif cmd == "byte":
        os.write(1, b"!")
    elif cmd == "idle":
        os.write(1, b"!")
        sleep_forever()
    elif cmd == "grow":
        grow()
    elif cmd == "family":
        family(int(rest[0]))
    elif cmd == "find-in-memory":
        prefix, length, digest = rest
        out.write(f"{find_in_memory(prefix.encode(), int(length), digest)}\n")
    elif cmd == "ipc":
        serve_ipc(int(rest[0]) if rest else 3)
    else:
        sys.stderr.write(f"probe: unknown command {cmd!r}\n")
        return 2
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
