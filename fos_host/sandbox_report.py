"""`fos-host demo --sandbox-report`: sandbox a Python workload from the zygote and print what
it can see and do — an isolation report in the spirit of chrome://sandbox — then attack from
inside. Exits 1 if any check fails, so it doubles as a quick check of a machine's sandboxing.

Needs nothing outside this machine.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Spawner


def _run(sp: Spawner, jail: Jail, *args: str, warm: bool = True) -> tuple[str, str, float]:
    r, w = os.pipe()
    jail.fds = {1: w}
    t0 = time.perf_counter()
    with sp.spawn(jail, entry="fos_host.probe:main", args=args, warm=warm) as sb:
        os.close(w)
        out = b""
        first = None
        while chunk := os.read(r, 65536):
            first = first or time.perf_counter()
            out += chunk
        os.close(r)
        status = sb.wait()
    ms = ((first or time.perf_counter()) - t0) * 1000
    return out.decode(), status.describe(), ms


def _row(name: str, ok: bool, detail: str) -> str:
    return f"  {'OK  ' if ok else 'FAIL'}  {name:<28} {detail}"


def run_sandbox_report() -> int:
    secret_dir = tempfile.mkdtemp(prefix="fos-demo-")
    secret = os.path.join(secret_dir, "secret.txt")
    with open(secret, "w") as f:
        f.write("host secret\n")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    bad = 0
    try:
        with Spawner(zygote=True, pool=1) as sp:
            jail = Jail("renderer").memory("64M").pids(32)
            _run(sp, jail, "byte", warm=False)  # the first one waits for the zygote's preload
            _, _, cold_ms = _run(sp, jail, "byte", warm=False)
            sp.prewarm(jail)
            sp.settle()
            text, why, ms = _run(sp, jail, "report")
            rep = json.loads(text)
            print(
                f"fos-host demo: a renderer sandbox from a warm spare in {ms:.1f} ms to its "
                f"first byte (cold from the zygote: {cold_ms:.1f} ms); it {why}\n"
            )
            print("Isolation report (seen from inside):")
            checks = [
                ("pid namespace", rep["visible_pids"] == [1], f"sees pids {rep['visible_pids']}"),
                (
                    "user namespace",
                    rep["uid_map"][:2] == ["0", rep["uid_map"][1]] and rep["uid_map"][1] != "0",
                    f"root inside = host uid {rep['uid_map'][1]}",
                ),
                ("network", rep["interfaces"] == ["lo"], f"interfaces {rep['interfaces']}"),
                ("hostname", rep["hostname"] == "fos-sandbox", rep["hostname"]),
                (
                    "capabilities",
                    rep["CapEff"] == rep["CapBnd"] == "0000000000000000",
                    f"CapEff {rep['CapEff']} CapBnd {rep['CapBnd']}",
                ),
                ("no_new_privs", rep["NoNewPrivs"] == "1", rep["NoNewPrivs"]),
                ("seccomp filter", rep["Seccomp"] == "2", f"mode {rep['Seccomp']}"),
                ("file descriptors", rep["fds"] == [0, 1, 2], str(rep["fds"])),
                ("environment", "NOTIFY_SOCKET" not in rep["environ"], ",".join(rep["environ"])),
                (
                    "cgroup namespace",
                    all(line.endswith(":/") for line in rep["cgroup"]),
                    "own cgroup is /",
                ),
                ("core dumps", rep["rlimit_core"] == [0, 0], str(rep["rlimit_core"])),
                ("own session", rep["sid_is_self"], "setsid"),
            ]
            for name, ok, detail in checks:
                bad += not ok
                print(_row(name, ok, detail))
            print("  mounts:", " ".join(rep["mounts"]))

            port = listener.getsockname()[1]
            text, why, ms = _run(
                sp,
                Jail("renderer").memory("64M").pids(32),
                "attack",
                f"secret={secret}",
                f"port={port}",
            )
            print("\nAttacks from inside (each must fail):")
            for res in json.loads(text):
                bad += not res["blocked"]
                print(_row(res["attack"], res["blocked"], res["how"]))

            text, why, ms = _run(sp, Jail("renderer").memory("32M"), "alloc", "200")
            print("\nAllocating 200 MiB under a 32 MiB limit:", why)
    finally:
        listener.close()
        os.unlink(secret)
        os.rmdir(secret_dir)
    print(f"\n{'all checks passed' if not bad else f'{bad} check(s) FAILED'}")
    return 1 if bad else 0
