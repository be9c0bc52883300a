"""`fos-host exec`, `seccomp dump` and their errors, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import fos_cgroups

ROOT = os.geteuid() == 0
FOS = [sys.executable, "-m", "fos_host.cli"]
PY = sys.executable


class Result:
    def __init__(self, pid: int, returncode: int, stdout: str, stderr: str) -> None:
        self.pid, self.returncode, self.stdout, self.stderr = pid, returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"Result(rc={self.returncode}, stderr={self.stderr!r})"


def fos(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> Result:
    """Run fos-host (with `env` instead of this process's environment, if given)."""
    with subprocess.Popen(
        [*FOS, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as p:
        out, err = p.communicate(timeout=timeout)
    return Result(p.pid, p.returncode, out, err)


def cgroups_of(pid: int) -> list[Path]:
    """The cgroup directories a host process with this pid made (fos.<pid>.<start>)."""
    return [p for p in fos_cgroups() if p.name.startswith(f"fos.{pid}.")]


def test_exit_status_is_the_commands() -> None:
    assert fos("exec", "--", PY, "-c", "print('hi')").stdout == "hi\n"
    r = fos("exec", "--", PY, "-c", "raise SystemExit(3)")
    assert r.returncode == 3
    assert r.stderr == ""


def test_oom_prints_one_line() -> None:
    r = fos("exec", "--memory", "32M", "--", PY, "-c", "x = bytearray(200 << 20)")
    assert r.returncode == 128 + signal.SIGKILL
    assert r.stderr == "fos-host: sandbox out of memory at the 32 MiB limit\n"


def test_seccomp_kill_prints_one_line() -> None:
    r = fos("exec", "--", PY, "-c", "import socket; socket.socket(socket.AF_INET)")
    assert r.returncode == 128 + signal.SIGSYS
    assert r.stderr.startswith("fos-host: sandbox killed by seccomp")
    assert len(r.stderr.splitlines()) == 1


def test_seccomp_learn_lists_what_the_profile_refuses() -> None:
    code = "import socket, os; socket.socket(socket.AF_INET).close(); print('ran')"
    r = fos("exec", "--seccomp-learn", "--json", "--", PY, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ran\n"
    lines = r.stderr.splitlines()
    assert "would have refused: " in lines[0] and "socket" in lines[0]
    assert "socket" in json.loads(lines[-1])["refused"]


def test_json_outcome() -> None:
    r = fos("exec", "--json", "--pids", "16", "--cpu-weight", "50", "--", PY, "-c", "pass")
    out = json.loads(r.stderr)
    assert out["returncode"] == 0 and out["reason"] == "exited with status 0"
    if ROOT:
        assert out["host_uid"] >= 300000


def test_binds_and_tmpfs(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("data")
    tmp_path.chmod(0o755)
    (tmp_path / "in.txt").chmod(0o644)
    code = (
        "import os; print(open('/data/in.txt').read());"
        "open('/scratch/x', 'w').write('ok'); print(os.listdir('/scratch'))"
    )
    r = fos("exec", "--ro-bind", f"{tmp_path}:/data", "--tmpfs", "/scratch", "--", PY, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "data\n['x']\n"
    # a bind below /tmp is not hidden by the sandbox's private /tmp
    code = f"print(open('{tmp_path}/in.txt').read())"
    r = fos("exec", "--ro-bind", str(tmp_path), "--", PY, "-c", code)
    assert (r.returncode, r.stdout) == (0, "data\n"), r.stderr
    code = "open('/data/new', 'w')"
    r = fos("exec", "--ro-bind", f"{tmp_path}:/data", "--", PY, "-c", code)
    assert "Read-only file system" in r.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["exec", "--bogus", "--", "true"], "unrecognized arguments: --bogus"),
        (["exec", "--profile", "nope", "--", "true"], "unknown profile 'nope'"),
        (["exec", "--memory", "lots", "--", "true"], "lots"),
        (["exec", "--pids", "0", "--", "true"], "pids limit"),
        (["exec", "--cpu-weight", "0", "--", "true"], "cpu weight"),
        (["exec", "--ro-bind", "/nonexistent-fos", "--", "true"], "does not exist"),
        (["exec", "--setenv", "NOEQUALS", "--", "true"], "KEY=VALUE"),
        (["exec"], "no command given"),
        (["exec", "--profile", "/nonexistent/x.policy", "--", "true"], "x.policy"),
        (["seccomp", "dump", "nope"], "nope"),
        (["demo", "--tabs", "0"], "--tabs wants 1 to"),
        (["demo", "--sandbox-report", "--once"], "not --sandbox-report"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(args: list[str], needle: str) -> None:
    r = fos(*args)
    assert r.returncode == 2, r
    assert r.stderr.startswith("fos-host: ") and needle in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert cgroups_of(r.pid) == []


def test_bad_policy_file_names_the_line(tmp_path: Path) -> None:
    pol = tmp_path / "bad.policy"
    pol.write_text("default kill\nallow read\nallow frobnicate\n")
    r = fos("exec", "--profile", str(pol), "--", "true")
    assert r.returncode == 2
    assert f"{pol}:3:" in r.stderr and "frobnicate" in r.stderr


def test_missing_command_exits_127() -> None:
    r = fos("exec", "--", "/nonexistent-command")
    assert r.returncode == 127
    assert r.stderr == "fos-host: exec /nonexistent-command: ENOENT (No such file or directory)\n"


def test_seccomp_dump_is_readable_pfc() -> None:
    r = fos("seccomp", "dump", "renderer")
    assert r.returncode == 0
    assert "pseudo filter code" in r.stdout and "action KILL_PROCESS" in r.stdout


def test_seccomp_dump_json_is_the_policy_as_data() -> None:
    r = fos("seccomp", "dump", "--json", "renderer")
    assert r.returncode == 0, r.stderr
    policy = json.loads(r.stdout)
    assert (policy["name"], policy["default"]) == ("renderer", "kill")
    # a renderer may make unix sockets only: socket(AF_UNIX, ...), argument 0 masked to 32 bits
    (socket,) = [rule for rule in policy["rules"] if rule["syscall"] == "socket"]
    assert socket["conditions"] == [{"arg": 0, "mask": 0xFFFFFFFF, "value": 1}]


HOST_SCRIPT = """
import os, sys
from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Spawner
sp = Spawner(zygote=True).__enter__()
null = os.open("/dev/null", os.O_WRONLY)
sbs = [sp.spawn(Jail("renderer").memory("64M").pass_fd(null, 1), entry="fos_host.probe:main",
                args=("idle",)) for _ in range(2)]
print(" ".join(str(sb.pid) for sb in sbs), sp.zygote.pid, flush=True)
os.read(0, 1)  # wait to be killed
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigkill_of_the_host_leaves_no_sandbox_and_next_start_cleans_cgroups() -> None:
    host = subprocess.Popen(
        [PY, "-c", HOST_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(p) for p in host.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        stale = cgroups_of(host.pid)
        assert stale, "the host made no cgroup"
    finally:
        host.kill()
        host.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(p) for p in pids), "a sandboxed process outlived its host"
    # The SIGKILLed host could not remove its cgroups; the next start does.
    assert cgroups_of(host.pid) == stale
    r = fos("exec", "--", PY, "-c", "pass")
    assert r.returncode == 0, r.stderr
    assert cgroups_of(host.pid) == []
