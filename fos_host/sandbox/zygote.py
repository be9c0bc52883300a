"""The zygote: a long-lived, single-threaded, preloaded process that forks every sandbox.

The zygote itself is exec'd, a fresh interpreter, so no memory of the process that starts it
reaches a sandbox. Its children are never exec'd for Python workloads: they start with the
interpreter and the preloaded modules already in memory, shared copy-on-write (`gc.freeze()`
before forking keeps the collector from touching — and so copying — the inherited objects).

Wire: one SEQPACKET socketpair. Request = a `Plan` as JSON with the fds to pass
(SCM_RIGHTS). Reply = JSON {"pid": G} or {"error": why, "pid": G-or-null}, plus the seccomp
notification fd in learn mode. The zygote forks one sandbox at a time, so it never needs a
thread; it exits when the host closes its end, and dies with the host (PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import signal
import socket
import sys

from fos_host.errors import FosError
from fos_host.kernel import fds as kfds
from fos_host.kernel import proc
from fos_host.sandbox.spawn import Launched, LaunchError, Plan, launch

MAX_REQUEST = 1 << 20
ZYGOTE_FD = 3  # the zygote's end of its socketpair, in the zygote
ZYGOTE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# run by `python -I -B -c BOOT PATH_JSON HOST_PID PRELOAD...`: the host's sys.path, the zygote
BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from fos_host.sandbox.zygote import main; main()"
)
MAX_FDS = 64
PRELOAD = ("json", "asyncio", "socket", "fos_host.probe")
# What a browser host's zygote loads: the renderer and its engine, with the engine's lazy
# loads done ("module:function" entries are called after the import).
RENDERER_PRELOAD = (
    *PRELOAD, "fos_host.renderer.main", "fos_host.renderer.page:preload",
    "fos_host.renderer.main:warm_up",
)  # fmt: skip


class Zygote:
    """Host half: start it, ask it to launch plans, close it."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock

    @classmethod
    def start(cls, preload: tuple[str, ...] = PRELOAD) -> Zygote:
        """Exec a fresh interpreter as the zygote (not a fork of this process): nothing of
        this process's memory — its heap, its environment, whatever it has read — is copied
        into the sandboxes, and the zygote starts single-threaded whatever this process is.
        It imports from this process's sys.path, so a venv, an editable install or a shiv
        binary all work; -I keeps the PYTHON* variables and the user's site out, -B bytecode."""
        host_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-I", "-B", "-c", BOOT, json.dumps(sys.path), str(os.getpid()),
                *preload]  # fmt: skip
        env = dict(ZYGOTE_ENV)
        if "FOS_HOST_DATA" in os.environ:  # where the policies are (fos_host/paths.py)
            env["FOS_HOST_DATA"] = os.environ["FOS_HOST_DATA"]
        try:
            pid = os.posix_spawn(
                sys.executable, argv, env,
                file_actions=[(os.POSIX_SPAWN_DUP2, zygote_end.fileno(), ZYGOTE_FD)],
            )  # fmt: skip
        except BaseException:
            host_end.close()
            raise
        finally:
            zygote_end.close()
        return cls(pid, host_end)

    def launch(self, plan: Plan, pass_fds: list[int]) -> Launched:
        self.submit(plan, pass_fds)
        return self.result()

    def submit(self, plan: Plan, pass_fds: list[int]) -> None:
        """Send a request without waiting; `result()` reads the replies in the same order."""
        try:
            kfds.send_fds(self._sock, plan.to_json(), pass_fds)
        except OSError as e:
            raise FosError(f"the zygote is gone: {e}") from e

    def result(self) -> Launched:
        try:
            raw, got = kfds.recv_fds(self._sock, MAX_REQUEST, 1)
        except OSError as e:
            raise FosError(f"the zygote is gone: {e}") from e
        if not raw:
            raise FosError("the zygote is gone (it closed its socket)")
        reply = json.loads(raw)
        if "error" in reply:
            for fd in got:
                os.close(fd)
            raise LaunchError(reply["error"], reply["pid"])
        return Launched(reply["pid"], got[0] if got else None)

    def has_result(self) -> bool:
        """A reply is waiting (`result()` will not block)."""
        return bool(kfds.readable([self._sock.fileno()], 0))

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def main() -> None:
    """The zygote's entry (BOOT runs it): its socket on ZYGOTE_FD; argv: the host's sys.path
    (read by BOOT), the host's pid, the preload."""
    proc.die_with_parent()
    if os.getppid() != int(sys.argv[2]):  # the host died before the line above: nobody to serve
        return
    _serve(socket.socket(fileno=ZYGOTE_FD), tuple(sys.argv[3:]))


def _serve(sock: socket.socket, preload: tuple[str, ...]) -> None:
    proc.set_name("fos-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the host's to handle
    kfds.install_fds({}, (sock.fileno(),))
    for name in preload:
        module, _, function = name.partition(":")
        loaded = importlib.import_module(module)
        if function:
            getattr(loaded, function)()
    gc.freeze()
    while True:
        try:
            raw, got = kfds.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        except OSError:
            return
        if not raw:
            return
        reply: dict[str, object]
        try:
            launched = launch(Plan.from_json(raw), got)
            reply, out = {"pid": launched.pid}, launched.notify_fd
        except LaunchError as e:
            reply, out = {"error": str(e), "pid": e.pid}, None
        except (FosError, ValueError, TypeError, KeyError) as e:
            reply, out = {"error": f"bad request: {e}", "pid": None}, None
        finally:
            for fd in got:
                os.close(fd)
        kfds.send_fds(sock, json.dumps(reply).encode(), [out] if out is not None else [])
        if out is not None:
            os.close(out)
