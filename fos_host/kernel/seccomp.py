"""seccomp: policies are compiled to BPF in the host and loaded as raw bytes in the child.

Host half: `compile_bpf` turns a parsed `Policy` into a classic-BPF program with libseccomp
(through pyseccomp, imported lazily), cached per process by the policy's content hash;
`dump_pfc` prints libseccomp's readable form for review; `Learner` serves the user-notification
fd of a learn-mode filter, letting every call through while recording the ones the profile
would have refused.

Child half: `install_filter` sets no_new_privs and hands the bytes to seccomp(2) with ctypes.
It never imports libseccomp, so a freshly forked child pays ~0.2 ms and no import.

Every argument compare is MASKED_EQ within the low 32 bits (see `seccomp_policy`): libseccomp
compares all 64 bits of an argument, while the kernel truncates `int` arguments, so a plain
64-bit compare could be bypassed with high bits set.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import select
import signal
import struct
import time
from typing import TYPE_CHECKING, Any

from fos_host.closing import Closing
from fos_host.errors import ConfigError, StepError
from fos_host.kernel import libc

if TYPE_CHECKING:
    from fos_host.sandbox.seccomp_policy import Policy

# seccomp(2) and prctl(2) constants (linux/seccomp.h, linux/prctl.h, x86_64).
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SYS_prctl = 157
PR_SET_NO_NEW_PRIVS = 38
BPF_MAXINSNS = 4096
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

# Filter return values (SECCOMP_RET_*).
RET_KILL_PROCESS = 0x80000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_NOTIFY = 0x7FC00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000

STEP = "load seccomp"

# struct seccomp_notif: u64 id, u32 pid, u32 flags, struct seccomp_data {i32 nr, u32 arch,
# u64 instruction_pointer, u64 args[6]} — 80 bytes; struct seccomp_notif_resp: u64 id,
# i64 val, i32 error, u32 flags — 24 bytes.
_NOTIF = struct.Struct("=QIIiIQ6Q")
_NOTIF_RESP = struct.Struct("=QqiI")
assert _NOTIF.size == 80 and _NOTIF_RESP.size == 24


def action_value(action: str) -> int:
    """The SECCOMP_RET_* value of a policy action ("allow", "kill", "errno:EPERM", …)."""
    simple = {"allow": RET_ALLOW, "kill": RET_KILL_PROCESS, "trap": RET_TRAP, "log": RET_LOG}
    if action in simple:
        return simple[action]
    if action.startswith("errno:"):
        number = getattr(errno, action[len("errno:") :], None)
        if isinstance(number, int):
            return RET_ERRNO | (number & 0xFFFF)
    raise ValueError(f"unknown seccomp action {action!r}")


# --- host half -----------------------------------------------------------------------------


class _BpfCache:
    """Compiled programs of this process, keyed by (policy digest, learn).

    The one piece of module-level mutable state here, and deliberately so: compiling costs
    about a millisecond and a host spawns many sandboxes from few profiles. The digest covers
    every file a policy was read from, so an edited policy gets a new entry.
    """

    def __init__(self) -> None:
        self._programs: dict[tuple[str, bool], bytes] = {}

    def get(self, digest: str, learn: bool) -> bytes | None:
        return self._programs.get((digest, learn))

    def put(self, digest: str, learn: bool, program: bytes) -> bytes:
        return self._programs.setdefault((digest, learn), program)

    def clear(self) -> None:
        self._programs.clear()


_CACHE = _BpfCache()


def compile_bpf(policy: Policy, *, learn: bool = False) -> bytes:
    """The policy as a raw `struct sock_filter` array (8 bytes per instruction).

    With `learn`, every action that is not "allow" becomes SECCOMP_RET_USER_NOTIF, so a
    `Learner` on the listener fd can record the call and let it continue. The same bytes
    object is returned for the same (digest, learn) for the life of the process.
    """
    cached = _CACHE.get(policy.digest, learn)
    if cached is not None:
        return cached
    program = _export(_build(policy, learn=learn), "bpf")
    if len(program) % SOCK_FILTER_SIZE or len(program) // SOCK_FILTER_SIZE > BPF_MAXINSNS:
        raise ConfigError(f"{_shown(policy)}: compiled to {len(program)} bytes, not a usable BPF")
    return _CACHE.put(policy.digest, learn, program)


def dump_pfc(policy: Policy) -> str:
    """libseccomp's pseudo-filter-code listing of the policy, for review and golden tests."""
    return _export(_build(policy, learn=False), "pfc").decode()


def syscall_name(nr: int) -> str:
    """The native-architecture name of syscall `nr` ("syscall_N" when libseccomp has none)."""
    import pyseccomp

    try:
        return bytes(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, nr)).decode()
    except ValueError:
        return f"syscall_{nr}"


_AUDIT_FIELD = re.compile(r'(\w+)=("[^"]*"|\S+)')
AUDIT_SECCOMP = "type=1326"
AUDIT_ARCH_X86_64 = 0xC000003E


def killed_syscall(pid: int, host_uid: int | None = None, *, wait: float = 0.2) -> str | None:
    """The syscall seccomp killed process `pid` (host pid) on, or None if unknown.

    Read from the kernel's audit record of the kill (type 1326, logged for KILL_PROCESS
    by default) in /dev/kmsg; `host_uid` narrows the match to the sandbox's uid as seen
    from the host. Best effort: the log needs root, is rate-limited, and without auditd
    the record arrives through kauditd a moment after the death, hence `wait` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        found = _find_kill_record(pid, host_uid)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(0.01)


def _find_kill_record(pid: int, host_uid: int | None) -> str | None:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    found = None
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break  # read everything
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # overwritten while we read: go on with the next record
                break
            if AUDIT_SECCOMP not in record:
                continue
            fields = dict(_AUDIT_FIELD.findall(record.split(": ", 1)[-1]))
            if fields.get("pid") != str(pid) or fields.get("sig") != str(int(signal.SIGSYS)):
                continue
            if host_uid is not None and fields.get("uid") != str(host_uid):
                continue
            try:
                number = int(fields["syscall"])
                arch = int(fields.get("arch", "0"), 16)
            except (KeyError, ValueError):
                continue
            if arch == AUDIT_ARCH_X86_64:
                found = syscall_name(number)
            else:
                found = f"syscall_{number} (arch {arch:#x})"
    finally:
        os.close(fd)
    return found


def _shown(policy: Policy) -> str:
    from fos_host.sandbox.seccomp_policy import display_path

    return display_path(policy.path)


def _build(policy: Policy, *, learn: bool) -> Any:
    """A pyseccomp SyscallFilter holding the policy."""
    import pyseccomp

    def value(action: str) -> int:
        return RET_NOTIFY if learn and action != "allow" else action_value(action)

    default = value(policy.default)
    try:
        flt = pyseccomp.SyscallFilter(default)
        # Foreign ABIs (i386 int 0x80, x32) have other syscall numbers: kill, never map.
        flt.set_attr(pyseccomp.Attr.ACT_BADARCH, RET_KILL_PROCESS)
        # Binary search over syscall numbers instead of a linear chain (~130 rules).
        flt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    except OSError as exc:
        raise ConfigError(
            f"{_shown(policy)}: libseccomp cannot build this filter: {exc.strerror}"
            + (" (this kernel lacks seccomp user notification)" if learn else "")
        ) from None
    for rule in policy.rules:
        action = value(rule.action)
        if action == default:
            continue  # libseccomp refuses rules that repeat the default; they add nothing
        args = [pyseccomp.Arg(c.arg, pyseccomp.MASKED_EQ, c.mask, c.value) for c in rule.conds]
        try:
            flt.add_rule(action, rule.syscall, *args)
        except OSError as exc:
            raise ConfigError(
                f"{_shown(policy)}: libseccomp refused the rule for '{rule.syscall}': "
                f"{exc.strerror}"
            ) from None
    return flt


def _export(flt: Any, kind: str) -> bytes:
    """Run export_bpf/export_pfc into a memfd and read the result back."""
    fd = os.memfd_create(f"fos-seccomp-{kind}", os.MFD_CLOEXEC)
    with open(fd, "w+b", buffering=0) as out:
        if kind == "bpf":
            flt.export_bpf(out)
        else:
            flt.export_pfc(out)
        out.seek(0)
        return out.read()


class Learner(Closing):
    """Host half of learn mode: serves the user-notification fd of a learn-mode filter.

    Each notification is recorded and answered with SECCOMP_USER_NOTIF_FLAG_CONTINUE, so the
    call runs as if unfiltered. Call `handle_one` when `fileno()` is readable, or
    `run_until_exit(pidfd)`. Owns the fd: `close()` (or leaving a `with` block) closes it.
    """

    def __init__(self, notify_fd: int) -> None:
        self._fd = notify_fd
        self._numbers: set[int] = set()

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Learner is closed")
        return self._fd

    def handle_one(self) -> None:
        """Receive one notification (blocks until there is one), record it, let it run."""
        buf = bytearray(_NOTIF.size)  # the kernel insists on a zeroed buffer
        try:
            fcntl.ioctl(self.fileno(), SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return  # the caller died or was interrupted before we got to it
            raise StepError("seccomp notification", exc.errno or 0, "receive") from None
        notif_id, _pid, _flags, nr, _arch, _ip, *_args = _NOTIF.unpack(buf)
        self._numbers.add(nr)
        resp = _NOTIF_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        try:
            fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SEND, resp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the target died meanwhile
                raise StepError("seccomp notification", exc.errno or 0, "respond") from None

    def run_until_exit(self, pidfd: int) -> None:
        """Handle notifications until the process behind `pidfd` has exited."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if events.get(self._fd, 0) & select.POLLIN:
                self.handle_one()
            elif pidfd in events or events.get(self._fd, 0):
                return  # exited, or the filter has no users left (POLLHUP)

    def refused(self) -> list[str]:
        """Sorted names of the syscalls the profile would have refused."""
        return sorted({syscall_name(nr) for nr in self._numbers})

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


# --- child half ----------------------------------------------------------------------------


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter(bpf: bytes, *, listener: bool = False) -> int | None:
    """Set no_new_privs and load `bpf` (from `compile_bpf`) into the calling process.

    With `listener`, returns the user-notification fd (for a learn-mode filter: pass it to
    the host, which serves it with a `Learner`); otherwise None. Failures raise
    `StepError("load seccomp", errno)`.
    """
    count, rest = divmod(len(bpf), SOCK_FILTER_SIZE)
    if rest or not 0 < count <= BPF_MAXINSNS:
        raise StepError(STEP, errno.EINVAL, f"{len(bpf)} bytes is not a BPF program")
    libc.check(libc.syscall(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), STEP, "no_new_privs")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(count, ctypes.addressof(program))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    ret = libc.check(
        libc.syscall(
            libc.SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            flags,
            ctypes.c_void_p(ctypes.addressof(fprog)),
        ),
        STEP,
    )
    return ret if listener else None
