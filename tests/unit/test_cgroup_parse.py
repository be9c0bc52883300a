"""Pure parsing in fos_host.kernel.cgroup: sizes, limits, tier profiles, PSI, layout detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from fos_host.errors import ConfigError
from fos_host.kernel import cgroup
from fos_host.kernel.cgroup import (
    Layout,
    Limits,
    TierProfile,
    cpu_shares,
    format_size,
    load_tiers,
    parse_pressure,
    parse_size,
)

MiB = 1 << 20


# ---- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("64M", 64 * MiB),
        ("64m", 64 * MiB),
        ("1G", 1 << 30),
        ("512K", 512 << 10),
        ("2T", 2 << 40),
        ("64MiB", 64 * MiB),
        ("64MB", 64 * MiB),
        ("64 MiB", 64 * MiB),
        (" 64M ", 64 * MiB),
        ("100b", 100),
        ("100 B", 100),
        ("1.5G", 3 << 29),
        ("0.5k", 512),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "M", "64X", "-1", "64 M B", "1.5", "1e6", "64MM", "sixty", "0x40", "9" * 30, "1,5G"],
)
def test_parse_size_junk(text: str) -> None:
    with pytest.raises(ConfigError, match="bad size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (100, "100 B"),
        (1024, "1 KiB"),
        (64 * MiB, "64 MiB"),
        (3 << 29, "1.5 GiB"),
        (1 << 40, "1 TiB"),
        (1536, "1.5 KiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("n", [0, 1, 4096, 32 * MiB, 3 << 29, 5 << 40])
def test_format_parse_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


def test_format_size_negative() -> None:
    with pytest.raises(ValueError):
        format_size(-1)


# ---- limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"memory_max": 0}, "memory_max"),
        ({"memory_high": -5}, "memory_high"),
        ({"pids_max": 0}, "pids_max"),
        ({"cpu_weight": 0}, "cpu_weight"),
        ({"cpu_weight": 10001}, "cpu_weight"),
        ({"cpu_weight": True}, "cpu_weight"),
        ({"memory_max": 1.5}, "memory_max"),
    ],
)
def test_limits_validated(kw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Limits(**kw)  # type: ignore[arg-type]


def test_limits_default_is_unset() -> None:
    assert Limits() == Limits(None, None, None, None)


def test_cpu_shares_mapping() -> None:
    assert cpu_shares(1) == 2
    assert cpu_shares(10000) == 262144
    assert cpu_shares(100) == 2597
    weights = [1, 2, 50, 100, 1000, 9999, 10000]
    shares = [cpu_shares(w) for w in weights]
    assert shares == sorted(shares)


# ---- tier profiles -----------------------------------------------------------------------


def test_default_tiers_load() -> None:
    tiers = load_tiers()
    assert {"active", "background", "frozen"} <= set(tiers)
    assert tiers["frozen"].freeze is True
    assert tiers["active"].freeze is False
    for tier in tiers.values():
        assert 1 <= tier.cpu_weight <= 10000
        assert 0 < tier.memory_high_ratio <= 1
    assert tiers["active"].cpu_weight > tiers["background"].cpu_weight


def test_tier_limits() -> None:
    tier = TierProfile("background", 25, 0.75, False)
    assert tier.limits(64 * MiB) == Limits(memory_high=48 * MiB, cpu_weight=25)
    assert tier.limits(None) == Limits(cpu_weight=25)


GOOD = "[active]\ncpu_weight = 100\nmemory_high_ratio = 1\nfreeze = false\n"


def _tiers_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tiers.toml"
    p.write_text(text)
    return p


def test_tiers_from_path(tmp_path: Path) -> None:
    tiers = load_tiers(_tiers_file(tmp_path, GOOD))
    assert tiers == {"active": TierProfile("active", 100, 1.0, False)}
    assert isinstance(tiers["active"].memory_high_ratio, float)


@pytest.mark.parametrize(
    ("text", "must_name"),
    [
        ("", "no tiers"),
        ("[active\n", "not valid TOML"),
        ("active = 3\n", "active"),
        ("[Active]\ncpu_weight = 1\nmemory_high_ratio = 1\nfreeze = false\n", "[Active]"),
        (GOOD.replace("freeze = false", "freeze = false\nswap = 1"), "[active] swap"),
        (GOOD.replace("freeze = false\n", ""), "[active] freeze: missing"),
        (GOOD.replace("cpu_weight = 100", "cpu_weight = 0"), "[active] cpu_weight"),
        (GOOD.replace("cpu_weight = 100", "cpu_weight = 10001"), "[active] cpu_weight"),
        (GOOD.replace("cpu_weight = 100", "cpu_weight = true"), "[active] cpu_weight"),
        (GOOD.replace("cpu_weight = 100", "cpu_weight = 1.5"), "[active] cpu_weight"),
        (GOOD.replace("ratio = 1", "ratio = 0"), "[active] memory_high_ratio"),
        (GOOD.replace("ratio = 1", "ratio = 1.5"), "[active] memory_high_ratio"),
        (GOOD.replace("ratio = 1", 'ratio = "half"'), "[active] memory_high_ratio"),
        (GOOD.replace("freeze = false", 'freeze = "yes"'), "[active] freeze"),
        (GOOD.replace("freeze = false", "freeze = 1"), "[active] freeze"),
    ],
)
def test_tiers_errors_name_file_and_key(tmp_path: Path, text: str, must_name: str) -> None:
    p = _tiers_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_tiers(p)
    assert str(p) in str(info.value)
    assert must_name in str(info.value)


def test_tiers_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read tier profiles"):
        load_tiers(tmp_path / "nope.toml")


def test_tiers_data_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cgroups").mkdir()
    (tmp_path / "cgroups" / "tiers.toml").write_text(GOOD)
    monkeypatch.setenv("FOS_HOST_DATA", str(tmp_path))
    assert list(load_tiers()) == ["active"]


# ---- PSI ---------------------------------------------------------------------------------


def test_parse_pressure() -> None:
    text = (
        "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"
    )
    assert parse_pressure(text) == {
        "some": {"avg10": 1.5, "avg60": 0.25, "avg300": 0.0, "total": 12345.0},
        "full": {"avg10": 0.0, "avg60": 0.0, "avg300": 0.0, "total": 7.0},
    }


# ---- layout detection (from texts; detect() itself runs in the integration tests) ---------

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/abc
1:cpu:/
0::/
"""


def _system(mountinfo: str, proc_cgroup: str) -> cgroup.CgroupSystem:
    return cgroup._system_from(
        cgroup._parse_mountinfo(mountinfo), cgroup._parse_proc_cgroup(proc_cgroup)
    )


def test_detect_text_hybrid() -> None:
    s = _system(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert s.layout is Layout.HYBRID
    assert s.v2_mount == Path("/sys/fs/cgroup/unified")
    assert s.v1_mounts == {
        "cpu": Path("/sys/fs/cgroup/cpu"),
        "memory": Path("/sys/fs/cgroup/memory"),
        "freezer": Path("/sys/fs/cgroup/freezer"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }
    assert s.own["memory"] == "/process_api/abc"
    assert s.own[cgroup.V2_KEY] == "/"
    assert s.own_dir("memory") == Path("/sys/fs/cgroup/memory/process_api/abc")
    assert s.own_dir(cgroup.V2_KEY) == Path("/sys/fs/cgroup/unified")


def test_detect_text_v1_comounted() -> None:
    mountinfo = (
        "25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "26 24 0:23 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    s = _system(mountinfo, "3:cpu,cpuacct:/a\n2:memory:/b\n")
    assert s.layout is Layout.V1
    assert s.v2_mount is None
    assert s.v1_mounts["cpu"] == s.v1_mounts["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert s.own_dir("cpu") == Path("/sys/fs/cgroup/cpu,cpuacct/a")
    assert s.own_dir("pids") is None


def test_detect_text_pure_v2() -> None:
    mountinfo = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    s = _system(mountinfo, "0::/user.slice/user-1000.slice/session-2.scope\n")
    assert s.layout is Layout.V2
    assert s.own_dir(cgroup.V2_KEY) == Path(
        "/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope"
    )


def test_detect_text_only_named_v1_is_not_v1() -> None:
    # name=systemd alone holds no controller: with cgroup2 beside it, the layout is pure v2.
    mountinfo = (
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    assert _system(mountinfo, "1:name=systemd:/\n0::/\n").layout is Layout.V2


def test_detect_text_nothing_mounted() -> None:
    with pytest.raises(ConfigError, match="no cgroup filesystem"):
        _system("22 1 0:21 / /proc rw - proc proc rw\n", "0::/\n")


def test_detect_text_mount_root_and_escapes() -> None:
    # A container's view: the memory mount shows only /docker/x, with a space escaped.
    mountinfo = "35 31 0:32 /docker/x /sys/fs/my\\040cg rw - cgroup cgroup rw,memory\n"
    s = _system(mountinfo, "4:memory:/docker/x/inner\n")
    assert s.v1_mounts["memory"] == Path("/sys/fs/my cg")
    assert s.own_dir("memory") == Path("/sys/fs/my cg/inner")


def test_detect_text_mount_not_showing_own_cgroup_is_skipped() -> None:
    mountinfo = (
        "35 31 0:32 /other /mnt/a rw - cgroup cgroup rw,memory\n"
        "36 31 0:32 / /mnt/b rw - cgroup cgroup rw,memory\n"
    )
    s = _system(mountinfo, "4:memory:/mine\n")
    assert s.own_dir("memory") == Path("/mnt/b/mine")
