"""The seccomp policy parser and compiler (no filter is loaded here; see integration tests)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from fos_host.errors import ConfigError
from fos_host.kernel.seccomp import (
    RET_KILL_PROCESS,
    action_value,
    compile_bpf,
    dump_pfc,
    syscall_name,
)
from fos_host.paths import data_dir
from fos_host.sandbox.seccomp_policy import (
    Cond,
    Policy,
    Rule,
    available_profiles,
    display_path,
    load_policy,
)

PROFILES = ["network", "renderer", "storage"]
# Never allowed by any shipped profile, and always allowed.
FORBIDDEN = frozenset(
    {
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "bpf",
        "keyctl",
        "add_key",
        "request_key",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "reboot",
        "personality",
        "setuid",
        "setgid",
        "setreuid",
        "setregid",
        "setresuid",
        "setresgid",
        "setfsuid",
        "setfsgid",
        "setgroups",
        "seccomp",
        "clone3",
    }
)
NEEDED = frozenset(
    {"read", "write", "mmap", "futex", "execve", "exit_group", "rt_sigreturn", "clone"}
)

SETS = """\
# shared sets
set @io: read write close
set @io: lseek   # appended
set @more: @io getpid
"""

GOOD = """\
default kill   # kill the process
include sets

allow @more gettid
allow socket socketpair if arg0 == AF_UNIX
allow socket if arg0 == AF_INET and arg1 & SOCK_TYPE_MASK == SOCK_STREAM
allow clone if arg0 & CLONE_NEWUSER|CLONE_NEWNS == 0
allow ioctl if arg1 == 0x541b
allow ioctl if arg1 == TCGETS
allow openat if arg0 == -100
errno ENOSYS clone3
errno EPERM ptrace
trap personality
log uname
"""


def write(directory: Path, **files: str) -> None:
    for name, text in files.items():
        (directory / f"{name}.policy").write_text(text)


def test_parses_a_good_file(tmp_path: Path) -> None:
    write(tmp_path, sets=SETS, good=GOOD)
    policy = load_policy(str(tmp_path / "good.policy"))
    assert policy.name == "good"
    assert policy.path == tmp_path / "good.policy"
    assert policy.default == "kill"
    assert re.fullmatch(r"[0-9a-f]{64}", policy.digest)
    rules = policy.rules
    unconditional = [r.syscall for r in rules if r.action == "allow" and not r.conds]
    assert unconditional == ["read", "write", "close", "lseek", "getpid", "gettid"]
    assert Rule("socket", "allow", (Cond(0, 0xFFFFFFFF, 1),)) in rules
    assert Rule("socketpair", "allow", (Cond(0, 0xFFFFFFFF, 1),)) in rules
    assert Rule("socket", "allow", (Cond(0, 0xFFFFFFFF, 2), Cond(1, 0xF, 1))) in rules
    assert Rule("clone", "allow", (Cond(0, 0x10020000, 0),)) in rules
    ioctls = [r.conds for r in rules if r.syscall == "ioctl"]
    assert ioctls == [(Cond(1, 0xFFFFFFFF, 0x541B),), (Cond(1, 0xFFFFFFFF, 0x5401),)]
    assert Rule("openat", "allow", (Cond(0, 0xFFFFFFFF, 0xFFFFFF9C),)) in rules
    assert Rule("clone3", "errno:ENOSYS") in rules
    assert Rule("ptrace", "errno:EPERM") in rules
    assert Rule("personality", "trap") in rules
    assert Rule("uname", "log") in rules
    assert policy.syscalls("trap") == ["personality"]


def test_every_comparison_stays_within_32_bits(tmp_path: Path) -> None:
    for name in PROFILES:
        for rule in load_policy(name).rules:
            for cond in rule.conds:
                assert 0 < cond.mask <= 0xFFFFFFFF
                assert cond.value & ~cond.mask == 0


def test_duplicate_rules_are_merged(tmp_path: Path) -> None:
    write(tmp_path, p="default kill\nset @a: read write\nallow @a\nallow read\nallow @a\n")
    policy = load_policy(str(tmp_path / "p.policy"))
    assert [r.syscall for r in policy.rules] == ["read", "write"]


BAD_CASES = [
    ("allow read foo_bar\n", 2, "unknown syscall 'foo_bar'"),
    ("allow socketcall\n", 2, "unknown syscall 'socketcall'"),  # pseudo-syscall, not x86_64
    ("allow Read\n", 2, "unknown syscall 'Read'"),
    ("allow socket if arg0 == AF_NOPE\n", 2, "unknown constant 'AF_NOPE'"),
    ("allow socket if arg0 & NOPE|AF_UNIX == 1\n", 2, "unknown constant 'NOPE'"),
    ("allow @nope\n", 2, "unknown set '@nope'"),
    ("allow socket if arg0 = 1\n", 2, "bad condition 'arg0 = 1'"),
    ("allow socket if arg0 == 1 or arg1 == 2\n", 2, "bad condition"),
    ("allow socket if\n", 2, "'if' needs a condition"),
    ("allow if arg0 == 1\n", 2, "needs at least one syscall"),
    ("allow socket if arg6 == 1\n", 2, "arg6 does not exist"),
    ("allow socket if arg0 == 1 and arg0 == 2\n", 2, "arg0 is compared twice"),
    ("allow socket if arg0 == 0x100000001\n", 2, "does not fit in 32 bits"),
    ("allow socket if arg0 & 0xf == 0x10\n", 2, "has bits outside mask"),
    ("allow socket if arg0 & 0 == 0\n", 2, "mask of arg0 is 0"),
    ("allow read\nerrno EPERM read\n", 3, "syscall 'read' is given 'errno:EPERM' here but 'allow'"),
    ("errno ENOSYS clone3\nallow clone3\n", 3, "given 'allow' here but 'errno:ENOSYS'"),
    ("allow socket\nallow socket if arg0 == AF_UNIX\n", 3, "has conditions here"),
    ("allow socket if arg0 == AF_UNIX\nallow socket\n", 3, "is unconditional here"),
    ("errno EFOO read\n", 2, "unknown errno 'EFOO'"),
    ("errno\n", 2, "'errno' needs an errno name"),
    ("deny read\n", 2, "unknown directive 'deny'"),
    ("default kill\n", 2, "a second 'default' line"),
    ("set io: read\n", 2, "expected 'set @name: syscall ...'"),
    ("set @io read\n", 2, "expected 'set @name: syscall ...'"),
    ("include nope\n", 2, "cannot read"),
    ("include ../x\n", 2, "'include' takes one file name"),
]


@pytest.mark.parametrize(("body", "line", "message"), BAD_CASES)
def test_errors_name_file_and_line(tmp_path: Path, body: str, line: int, message: str) -> None:
    path = tmp_path / "bad.policy"
    path.write_text("default kill\n" + body)
    with pytest.raises(ConfigError) as info:
        load_policy(str(path))
    text = str(info.value)
    assert text.startswith(f"{path}:{line}: "), text
    assert message in text
    assert info.value.exit_code == 2


def test_bad_default_action(tmp_path: Path) -> None:
    path = tmp_path / "bad.policy"
    path.write_text("# x\ndefault deny\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2: unknown default action"):
        load_policy(str(path))
    path.write_text("default kill now\n")
    with pytest.raises(ConfigError, match=r":1: unexpected 'now'"):
        load_policy(str(path))


def test_missing_default(tmp_path: Path) -> None:
    path = tmp_path / "bad.policy"
    path.write_text("allow read\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: missing 'default'"):
        load_policy(str(path))


def test_errors_inside_an_included_file_name_that_file(tmp_path: Path) -> None:
    write(tmp_path, sets="set @a: read\n\nset @b: nosuchcall\n", p="default kill\ninclude sets\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/sets.policy:3: unknown"):
        load_policy(str(tmp_path / "p.policy"))
    write(tmp_path, sets="allow read\n")
    with pytest.raises(ConfigError, match=r"sets.policy:1: 'allow' in an included file"):
        load_policy(str(tmp_path / "p.policy"))


def test_paths_inside_the_repository_are_shown_relative() -> None:
    assert display_path(data_dir("seccomp") / "renderer.policy") == "seccomp/renderer.policy"
    assert display_path(Path("/nonexistent/x.policy")) == "/nonexistent/x.policy"


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"'nope' \(available: network, renderer, storage\)"):
        load_policy("nope")


def test_profiles_by_name_come_from_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "seccomp").mkdir()
    write(tmp_path / "seccomp", sets=SETS, mine="default errno EPERM\ninclude sets\nallow @io\n")
    monkeypatch.setenv("FOS_HOST_DATA", str(tmp_path))
    assert available_profiles() == ["mine"]
    policy = load_policy("mine")
    assert policy.default == "errno:EPERM"
    assert policy.path == tmp_path / "seccomp" / "mine.policy"


def test_shipped_profiles() -> None:
    assert available_profiles() == PROFILES


@pytest.mark.parametrize("name", PROFILES)
def test_shipped_profiles_parse_and_compile(name: str) -> None:
    policy = load_policy(name)
    assert policy.default == "kill"
    for learn in (False, True):
        bpf = compile_bpf(policy, learn=learn)
        assert len(bpf) % 8 == 0
        assert 0 < len(bpf) // 8 <= 4096
    allowed = set(policy.syscalls("allow"))
    assert not FORBIDDEN & allowed, sorted(FORBIDDEN & allowed)
    assert allowed >= NEEDED
    assert [r for r in policy.rules if r.syscall == "clone3"] == [Rule("clone3", "errno:ENOSYS")]
    (socketpair,) = [r for r in policy.rules if r.syscall == "socketpair"]
    assert socketpair.conds == (Cond(0, 0xFFFFFFFF, 1),)
    ioctl_requests = {r.conds[0].value for r in policy.rules if r.syscall == "ioctl"}
    assert 0x5412 not in ioctl_requests  # TIOCSTI


def test_renderer_sockets_are_unix_only() -> None:
    policy = load_policy("renderer")
    sockets = [r for r in policy.rules if r.syscall == "socket"]
    assert sockets == [Rule("socket", "allow", (Cond(0, 0xFFFFFFFF, 1),))]
    for call in ("setsockopt", "sendmmsg", "rename", "unlink", "fsync"):
        assert call not in policy.syscalls()


def test_network_and_storage_extend_the_renderer() -> None:
    renderer = set(load_policy("renderer").syscalls())
    network = set(load_policy("network").syscalls())
    storage = set(load_policy("storage").syscalls())
    assert network - renderer == {"setsockopt", "sendmmsg", "recvmmsg"}
    assert {"fsync", "fdatasync", "flock", "fallocate", "pwrite64", "renameat2"} <= storage
    assert renderer <= network and renderer <= storage
    families = {r.conds[0].value for r in load_policy("network").rules if r.syscall == "socket"}
    assert families == {1, 2, 10}  # AF_UNIX, AF_INET, AF_INET6: no AF_NETLINK, AF_PACKET


def test_renderer_pfc_uses_masked_compares_for_socket() -> None:
    pfc = dump_pfc(load_policy("renderer"))
    block = pfc[pfc.index('# filter for syscall "socket" (41)') :]
    block = block[: block.index("# filter for syscall", 1)]
    # The high word is ignored (mask 0), the low word compared exactly: as the kernel reads int.
    assert "if ($a0.hi32 & 0x00000000 == 0)" in block
    assert "if ($a0.lo32 & 0xffffffff == 1)" in block
    assert "action ALLOW;" in block
    assert not re.search(r"\$a0 ", block)
    clone = pfc[pfc.index('# filter for syscall "clone" (56)') :]
    assert "if ($a0.lo32 & 0x7e020000 == 0)" in clone[: clone.index("# filter for", 1)]
    assert 'syscall "clone3" (435)' in pfc and "action ERRNO(38);" in pfc
    assert "# default action\n  action KILL_PROCESS;" in pfc
    assert "# invalid architecture action\naction KILL_PROCESS;" in pfc


def test_digest_changes_with_any_file(tmp_path: Path) -> None:
    write(tmp_path, sets=SETS, good=GOOD)
    path = str(tmp_path / "good.policy")
    first = load_policy(path).digest
    assert load_policy(path).digest == first
    (tmp_path / "good.policy").write_text(GOOD + "allow getppid\n")
    second = load_policy(path).digest
    assert second != first
    (tmp_path / "sets.policy").write_text(SETS + "set @io: readv\n")
    assert load_policy(path).digest not in (first, second)


def test_compile_is_cached_by_digest(tmp_path: Path) -> None:
    write(tmp_path, sets=SETS, good=GOOD)
    path = str(tmp_path / "good.policy")
    first = compile_bpf(load_policy(path))
    assert compile_bpf(load_policy(path)) is first
    learn = compile_bpf(load_policy(path), learn=True)
    assert learn is not first and learn != first
    assert compile_bpf(load_policy(path), learn=True) is learn
    (tmp_path / "good.policy").write_text(GOOD + "allow getppid\n")
    assert compile_bpf(load_policy(path)) != first


def test_policy_is_frozen() -> None:
    policy = load_policy("renderer")
    assert isinstance(policy, Policy)
    with pytest.raises(AttributeError):
        policy.default = "allow"  # type: ignore[misc]


def test_syscall_name() -> None:
    assert syscall_name(0) == "read"
    assert syscall_name(41) == "socket"
    assert syscall_name(99999) == "syscall_99999"


# --- the compiled program agrees with the policy ---------------------------------------------

AUDIT_ARCH = 0xC000003E  # x86_64


Insn = tuple[int, int, int, int]


def decode(program: bytes) -> list[Insn]:
    return [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]


def run_bpf(program: list[Insn], nr: int, args: tuple[int, ...], arch: int = AUDIT_ARCH) -> int:
    """A small classic-BPF interpreter over struct seccomp_data (what the kernel would return)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls, op, src = code & 0x07, code & 0xF0, x if code & 0x08 else k
        if cls == 0x00 and code & 0xE0 == 0x20:  # LD a word of seccomp_data
            a = struct.unpack_from("<I", data, k)[0]
        elif cls == 0x00:  # LD immediate or scratch memory
            a = k if code & 0xE0 == 0x00 else mem[k]
        elif cls == 0x01:  # LDX
            x = k if code & 0xE0 == 0x00 else mem[k]
        elif cls == 0x02:  # ST
            mem[k] = a
        elif cls == 0x03:  # STX
            mem[k] = x
        elif cls == 0x04:  # ALU
            ops = {0x00: a + src, 0x10: a - src, 0x40: a | src, 0x50: a & src}
            assert op in ops, f"ALU op {op:#x}"
            a = ops[op] & 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            if op == 0x00:
                pc += k
                continue
            taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            return k if code & 0x18 == 0 else a
        else:  # MISC: TAX / TXA
            if op == 0x00:
                x = a
            else:
                a = x


def expected(policy: Policy, name: str, args: tuple[int, ...]) -> int:
    for rule in policy.rules:
        if rule.syscall == name and all(args[c.arg] & c.mask == c.value for c in rule.conds):
            return action_value(rule.action)
    return action_value(policy.default)


def probe_args(rules: list[Rule]) -> list[tuple[int, ...]]:
    """Zeros and all-ones, and for each condition: its value, with high bits, one bit off."""
    cases = {(0,) * 6, (2**64 - 1,) * 6}
    for rule in rules:
        for cond in rule.conds:
            for value in (cond.value, cond.value | 1 << 32, cond.value ^ 1, ~cond.mask & U32):
                args = [0] * 6
                for other in rule.conds:
                    args[other.arg] = other.value
                args[cond.arg] = value
                cases.add(tuple(args))
    return sorted(cases)


U32 = 0xFFFFFFFF


@pytest.mark.parametrize("name", PROFILES)
def test_compiled_program_agrees_with_the_policy(name: str) -> None:
    policy = load_policy(name)
    program = decode(compile_bpf(policy))
    for nr in range(0, 480):
        name = syscall_name(nr)
        for args in probe_args([r for r in policy.rules if r.syscall == name]):
            assert run_bpf(program, nr, args) == expected(policy, name, args), (name, args)
    # Other ABIs: x32 numbers and a foreign architecture are killed.
    assert run_bpf(program, 0x40000000 | 39, (0,) * 6) == RET_KILL_PROCESS
    assert run_bpf(program, 20, (0,) * 6, arch=0x40000003) == RET_KILL_PROCESS  # i386


def test_socket_high_bits_in_the_compiled_renderer() -> None:
    program = decode(compile_bpf(load_policy("renderer")))
    allow, kill = action_value("allow"), action_value("kill")
    assert run_bpf(program, 41, (1, 1, 0, 0, 0, 0)) == allow
    assert run_bpf(program, 41, (0x1_00000001, 1, 0, 0, 0, 0)) == allow  # AF_UNIX to the kernel
    assert run_bpf(program, 41, (2, 1, 0, 0, 0, 0)) == kill
    assert run_bpf(program, 41, (0x1_00000002, 1, 0, 0, 0, 0)) == kill
