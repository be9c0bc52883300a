"""fos_host.host.sites: what a site is, locks, and which renderer a tab's document goes to."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fos_host.errors import ConfigError, FosError
from fos_host.host.sites import (
    Assignment,
    BadUrl,
    LockViolation,
    MiB,
    ProcessModel,
    Site,
    SiteLock,
    mem_total,
    process_limit,
    site_of,
)

SITES = [
    # the registrable domain from the PSL, subdomains folded in
    ("https://a.b.example.co.uk/x?y#z", "https://example.co.uk"),
    ("https://c.example.co.uk", "https://example.co.uk"),
    ("https://www.example.com/", "https://example.com"),
    ("https://city.kawasaki.jp/", "https://city.kawasaki.jp"),  # exception rule !city...
    ("https://a.b.kawasaki.jp/", "https://a.b.kawasaki.jp"),  # wildcard rule *.kawasaki.jp
    ("https://a.github.io/", "https://a.github.io"),  # private section: each user apart
    # .test is not on the list: the default rule makes it a public suffix
    ("http://news.fos.test/", "http://fos.test"),
    ("http://shop.fos.test/cart", "http://fos.test"),
    ("http://fos.test/", "http://fos.test"),
    # a host that is a public suffix is its own site
    ("https://co.uk/", "https://co.uk"),
    ("https://github.io/", "https://github.io"),
    ("http://localhost:3000/", "http://localhost"),
    ("http://app.localhost/", "http://app.localhost"),
    # case, ports, trailing dot
    ("HTTPS://WWW.Example.COM:8443/Path", "https://example.com"),
    ("https://example.com:443", "https://example.com"),
    ("https://example.com:/", "https://example.com"),
    ("https://example.com:0000443/", "https://example.com"),
    ("https://www.example.com./", "https://example.com"),
    # international names: UTS #46 mapping, non-transitional, then punycode
    ("https://münchen.de/", "https://xn--mnchen-3ya.de"),
    ("https://www.MÜNCHEN.DE/", "https://xn--mnchen-3ya.de"),
    ("https://xn--mnchen-3ya.de/", "https://xn--mnchen-3ya.de"),
    ("https://faß.de/", "https://xn--fa-hia.de"),  # not fass.de: another domain
    ("https://\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com/", "https://example.com"),  # fullwidth
    ("https://bücher。example/", "https://xn--bcher-kva.example"),  # ideographic full stop
    ("https://食狮.公司.cn/", "https://xn--85x722f.xn--55qx5d.cn"),  # IDN public suffix
    # real names with odd hyphens and underscores
    ("https://r3---sn-4g5e.googlevideo.com/", "https://googlevideo.com"),
    ("https://a_b.example.com/", "https://example.com"),
    # IP addresses are their own site, in canonical form
    ("http://127.0.0.1:8080/", "http://127.0.0.1"),
    ("http://1.2.3.4./", "http://1.2.3.4"),
    ("http://0x7f.1/", "http://127.0.0.1"),
    ("http://2130706433/", "http://127.0.0.1"),
    ("http://0177.0.0.01/", "http://127.0.0.1"),
    ("http://\uff11\uff12\uff17.0.0.1/", "http://127.0.0.1"),  # fullwidth digits
    ("http://[::1]:8080/", "http://[::1]"),
    ("http://[0:0:0:0:0:0:0:1]/", "http://[::1]"),
    ("http://[2001:DB8::A]/", "http://[2001:db8::a]"),
    # the userinfo trick: the host follows the last @
    ("http://a.com@b.com/", "http://b.com"),
    ("http://user:pass@b.com:81/", "http://b.com"),
    ("http://a.com:80@b.com@c.com/", "http://c.com"),
    ("http://a.com/@b.com", "http://a.com"),
    ("http://a.com?@b.com", "http://a.com"),
    ("http://a.com#@b.com", "http://a.com"),
]


@pytest.mark.parametrize(("url", "site"), SITES)
def test_site_of(url: str, site: str) -> None:
    assert str(site_of(url)) == site


BAD = [
    ("about:blank", "about: URLs have no site"),
    ("about:srcdoc", "about: URLs have no site"),
    ("data:text/html,<p>hi", "scheme 'data' has no site"),
    ("javascript:alert(1)", "scheme 'javascript' has no site"),
    ("file:///etc/passwd", "scheme 'file' has no site"),
    ("blob:https://a.com/1234", "scheme 'blob' has no site"),
    ("ftp://example.com/", "scheme 'ftp' has no site"),
    ("x" * 10_000 + "://a.com/", "scheme 'xxx"),
    ("example.com", "no scheme"),
    ("", "no scheme"),
    ("http:example.com", "expected http:// followed by a host"),
    ("http:/example.com", "expected http:// followed by a host"),
    ("http://", "no host"),
    ("http:///example.com", "no host"),
    ("http://:80/", "no host"),
    ("http://user@/", "no host"),
    ("http://evil.com\\@good.com/", "backslash"),
    ("http://exa mple.com/", "space or control"),
    ("http://exa\tmple.com/", "space or control"),
    (" http://example.com/", "scheme ' http' has no site"),
    ("http://ex%61mple.com/", "percent-encoded host"),
    ("http://example..com/", "empty label"),
    ("http://.example.com/", "empty label"),
    ("http://example.com../", "empty label"),
    ("http://a$b.com/", "characters a DNS name cannot have"),
    ("http://a<b.com/", "characters a DNS name cannot have"),
    ("https://ü$.com/", "characters a DNS name cannot have"),
    ("https://xn--zz.com/", "not valid punycode"),
    ("http://" + "a" * 64 + ".com/", "longer than 63"),
    ("http://" + "a." * 127 + "com/", "longer than 253"),
    ("http://a.com:99999/", "port '99999'"),
    ("http://a.com:8x/", "port '8x'"),
    ("http://a.com:1:2/", "port '1:2'"),
    ("http://a.com:" + "9" * 5000 + "/", "is not a number"),
    ("http://1.2.3.4.5/", "no IPv4 address"),
    ("http://256.1.1.1/", "no IPv4 address"),
    ("http://1.2.3.08/", "no IPv4 address"),
    ("http://example.123/", "no IPv4 address"),
    ("http://1." + "9" * 60 + "/", "no IPv4 address"),
    ("http://[::1/", "closing ]"),
    ("http://[::1]x/", "after an IPv6 address"),
    ("http://[1.2.3.4]/", "bad IPv6 address"),
    ("http://[fe80::1%25eth0]/", "zone ids"),
    ("http://::1/", "no host"),  # IPv6 without brackets
]


@pytest.mark.parametrize(("url", "reason"), BAD)
def test_bad_urls(url: str, reason: str) -> None:
    with pytest.raises(BadUrl, match=r"^bad URL ") as e:
        site_of(url)
    assert reason in str(e.value)
    assert e.value.url == url
    assert isinstance(e.value, FosError)


@pytest.mark.parametrize(
    "url", ["data:" + "x" * 100_000, "x" * 100_000 + ":", "http://a.com:" + "1" * 100_000]
)
def test_a_huge_url_is_shown_cut(url: str) -> None:
    with pytest.raises(BadUrl) as e:
        site_of(url)
    assert len(str(e.value)) < 400


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("https://a.b.example.co.uk/", "https://c.example.co.uk/", True),
        ("http://news.fos.test/", "http://shop.fos.test/", True),
        ("https://example.com:443/", "https://example.com:8443/", True),
        ("http://x.com/", "https://x.com/", False),
        ("https://example.co.uk/", "https://other.co.uk/", False),
        ("https://a.github.io/", "https://b.github.io/", False),
        ("http://1.2.3.4/", "http://5.6.3.4/", False),  # never eTLD+1 of an address
        ("https://faß.de/", "https://fass.de/", False),
        ("https://co.uk/", "https://example.co.uk/", False),
    ],
)
def test_same_site(one: str, other: str, same: bool) -> None:
    assert (site_of(one) == site_of(other)) is same


def test_site_is_a_frozen_value() -> None:
    site = Site("https", "example.co.uk")
    assert str(site) == "https://example.co.uk"
    assert site == site_of("https://www.example.co.uk/")
    assert len({site, site_of("https://example.co.uk")}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.domain = "evil.com"  # type: ignore[misc]


# --- locks ---------------------------------------------------------------------------------


def test_lock_allows_its_own_site() -> None:
    lock = SiteLock(site_of("https://example.co.uk/"))
    lock.check("https://news.example.co.uk:8443/a")
    assert lock.allows("https://a.b.example.co.uk/")


@pytest.mark.parametrize(
    "url",
    ["http://example.co.uk/", "https://evil.com/", "https://example.co.uk@evil.com/"],
)
def test_lock_refuses_other_sites(url: str) -> None:
    lock = SiteLock(site_of("https://example.co.uk/"))
    assert not lock.allows(url)
    with pytest.raises(LockViolation) as e:
        lock.check(url)
    assert e.value.locked_to == lock.site
    assert e.value.url_site == site_of(url)
    assert "https://example.co.uk" in str(e.value)
    assert str(site_of(url)) in str(e.value)


def test_lock_refuses_urls_without_a_site() -> None:
    lock = SiteLock(site_of("https://example.com/"))
    assert not lock.allows("javascript:alert(1)")
    with pytest.raises(BadUrl):
        lock.check("javascript:alert(1)")


def test_lock_never_changes() -> None:
    lock = SiteLock(site_of("https://example.com/"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        lock.site = site_of("https://evil.com/")  # type: ignore[misc]


# --- process model -------------------------------------------------------------------------


def test_two_sites_get_two_renderers() -> None:
    model = ProcessModel(process_limit=10, tabs_per_renderer=4)
    a = model.assign(1, "https://a.com/")
    b = model.assign(2, "https://b.com/")
    assert a.new and b.new and a.renderer != b.renderer
    assert (a.renderer, b.renderer) == (1, 2)
    assert a.lock == SiteLock(site_of("https://a.com"))
    assert model.tabs_of(a.renderer) == {1}
    assert model.lock_of(b.renderer).site == site_of("https://b.com")


def test_same_site_shares_up_to_tabs_per_renderer() -> None:
    model = ProcessModel(process_limit=10, tabs_per_renderer=2)
    first = model.assign(1, "http://news.fos.test/")
    second = model.assign(2, "http://shop.fos.test/")
    third = model.assign(3, "http://fos.test/")
    assert first.new and not second.new and second.renderer == first.renderer
    assert third.new and third.renderer != first.renderer
    fourth = model.assign(4, "http://fos.test/")  # joins the least loaded one
    assert fourth == Assignment(third.renderer, third.lock, new=False)


def test_default_is_a_renderer_per_tab_below_the_limit() -> None:
    model = ProcessModel(process_limit=3)
    ids = {model.assign(tab, "https://example.com/").renderer for tab in range(3)}
    assert ids == {1, 2, 3}


def test_at_the_limit_same_site_tabs_share_the_least_loaded() -> None:
    model = ProcessModel(process_limit=3, tabs_per_renderer=1)
    for tab in range(3):
        model.assign(tab, "https://a.com/")
    model.close(1)  # renderer 2 released: two renderers, below the limit again
    assert model.assign(10, "https://b.com/").new  # third renderer: at the limit now
    extra = [model.assign(tab, "https://a.com/") for tab in (20, 21, 22)]
    assert not any(a.new for a in extra)
    assert [a.renderer for a in extra] == [1, 3, 1]  # least loaded, lowest id on a tie
    assert model.tabs_of(1) == {0, 20, 22}
    assert len(model.locks()) == 3


def test_a_new_site_gets_a_renderer_even_above_the_limit() -> None:
    model = ProcessModel(process_limit=2, tabs_per_renderer=1)
    model.assign(1, "https://a.com/")
    model.assign(2, "https://a.com/")
    c = model.assign(3, "https://c.com/")
    assert c.new and c.renderer == 3
    assert len(model.locks()) == 3  # over the limit: isolation wins
    assert model.assign(4, "https://c.com/").renderer == 3  # but no more than needed


def test_same_site_navigation_stays() -> None:
    model = ProcessModel(process_limit=4)
    a = model.assign(1, "https://news.example.co.uk/")
    stay = model.navigate(1, "https://shop.example.co.uk/")
    assert stay == Assignment(a.renderer, a.lock, new=False, moved=False)


def test_cross_site_navigation_moves_and_releases() -> None:
    model = ProcessModel(process_limit=4, tabs_per_renderer=2)
    a = model.assign(1, "https://a.com/")
    model.assign(2, "https://a.com/")
    b = model.assign(3, "https://b.com/")
    away = model.navigate(1, "https://b.com/x")
    assert away == Assignment(b.renderer, b.lock, new=False, moved=True, left=a.renderer)
    last = model.navigate(2, "https://c.com/")
    assert last.new and last.moved and last.left == a.renderer
    assert last.released == a.renderer
    with pytest.raises(KeyError, match="no renderer 1"):
        model.tabs_of(a.renderer)
    assert model.renderer_of(2) == last.renderer
    assert model.tabs_of(b.renderer) == {1, 3}


def test_a_released_renderer_frees_its_slot_before_the_move() -> None:
    model = ProcessModel(process_limit=1)
    a = model.assign(1, "https://a.com/")
    moved = model.navigate(1, "https://b.com/")
    assert moved.released == a.renderer and moved.new
    assert model.locks() == {moved.renderer: SiteLock(site_of("https://b.com"))}


def test_renderer_ids_are_never_reused() -> None:
    model = ProcessModel(process_limit=4)
    assert model.assign(1, "https://a.com/").renderer == 1
    assert model.close(1) == 1
    assert model.assign(1, "https://a.com/").renderer == 2


def test_close() -> None:
    model = ProcessModel(process_limit=4, tabs_per_renderer=2)
    rid = model.assign(1, "https://a.com/").renderer
    model.assign(2, "https://a.com/")
    assert model.close(1) is None
    assert model.close(2) == rid
    assert model.locks() == {}
    with pytest.raises(KeyError, match="no tab 1"):
        model.close(1)
    with pytest.raises(KeyError, match="no tab 1"):
        model.renderer_of(1)
    with pytest.raises(KeyError, match="no tab 7"):
        model.navigate(7, "https://a.com/")


def test_misuse_and_bad_urls_leave_no_trace() -> None:
    model = ProcessModel(process_limit=4)
    model.assign(1, "https://a.com/")
    with pytest.raises(ValueError, match="tab 1 is already in renderer 1"):
        model.assign(1, "https://b.com/")
    with pytest.raises(BadUrl):
        model.assign(2, "javascript:alert(1)")
    with pytest.raises(BadUrl):
        model.navigate(1, "file:///etc/passwd")
    assert model.renderer_of(1) == 1
    assert model.locks() == {1: SiteLock(site_of("https://a.com"))}
    with pytest.raises(KeyError):
        model.renderer_of(2)


@pytest.mark.parametrize(("limit", "per"), [(0, 1), (1, 0), (-1, 3)])
def test_model_needs_room(limit: int, per: int) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        ProcessModel(process_limit=limit, tabs_per_renderer=per)


# --- process limit -------------------------------------------------------------------------

GiB = 1024 * MiB


@pytest.mark.parametrize(
    ("mem", "kwargs", "limit"),
    [
        (16 * GiB, {}, 102),  # 8 GiB for renderers / 80 MiB
        (8 * GiB, {}, 51),
        (1 * GiB, {}, 6),
        (256 * MiB, {}, 4),  # the floor: some isolation even on a tiny machine
        (0, {}, 4),
        (64 * GiB, {}, 256),  # the ceiling: 409 would be too many processes
        (16 * GiB, {"per_renderer_bytes": 160 * MiB}, 51),
        (16 * GiB, {"ceiling": 50}, 50),
        (1 * GiB, {"floor": 8}, 8),
        (1 * GiB, {"floor": 1, "ceiling": 1}, 1),
        (8 * GiB + 80 * MiB - 1, {}, 51),  # whole renderers only
    ],
)
def test_process_limit(mem: int, kwargs: dict[str, int], limit: int) -> None:
    assert process_limit(mem, **kwargs) == limit


@pytest.mark.parametrize(
    "args",
    [(-1, MiB, 4, 256), (GiB, 0, 4, 256), (GiB, MiB, 0, 256), (GiB, MiB, 10, 9)],
)
def test_process_limit_refuses_nonsense(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="need mem_total_bytes >= 0"):
        process_limit(*args)


def test_mem_total_of_this_machine() -> None:
    total = mem_total()
    assert 64 * MiB < total < 1 << 50
    assert total % 1024 == 0
    assert process_limit(total) >= 4


def test_mem_total_parses_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:  100 kB\nMemTotal:       16314012 kB\nBuffers: 1 kB\n")
    assert mem_total(str(meminfo)) == 16314012 * 1024


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("MemFree: 100 kB\n", "no MemTotal line"),
        ("MemTotal: 100 MB\n", "no MemTotal line in kB"),
        ("MemTotal: lots kB\n", "cannot read MemTotal"),
        ("MemTotal:\n", "cannot read MemTotal"),
        (None, "cannot read MemTotal"),
    ],
)
def test_mem_total_errors(tmp_path: Path, text: str | None, error: str) -> None:
    meminfo = tmp_path / "meminfo"
    if text is not None:
        meminfo.write_text(text)
    with pytest.raises(ConfigError, match=error):
        mem_total(str(meminfo))


# --- property: never a cross-site share ----------------------------------------------------

HOSTS = [  # six sites, two of them under two names
    "https://a.fos.test/",
    "https://b.fos.test/",
    "http://a.fos.test/",
    "https://example.co.uk/",
    "https://x.example.co.uk/",
    "https://co.uk/",
    "http://127.0.0.1:8000/",
    "http://[::1]/",
]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["assign", "assign", "navigate", "close"]),
        st.integers(0, 5),
        st.sampled_from(HOSTS),
    ),
    min_size=10,
    max_size=50,
)


@settings(max_examples=300, database=None, deadline=None)
@given(OPS, st.integers(1, 4), st.integers(1, 3))
def test_renderers_only_ever_hold_their_own_site(
    ops: list[tuple[str, int, str]], limit: int, per: int
) -> None:
    """After every step of any sequence: each renderer's tabs are all of its lock's site, no
    renderer has changed its lock, no released id is back, no renderer is kept empty; and a
    renderer is only added at the limit for a site that had none, only filled past `per` at
    the limit."""
    model = ProcessModel(process_limit=limit, tabs_per_renderer=per)
    url_of: dict[int, str] = {}
    lock_ever: dict[int, SiteLock] = {}
    released: set[int] = set()
    for op, tab, url in ops:
        before = {rid: model.tabs_of(rid) for rid in model.locks()}
        if op == "close" and tab in url_of:
            gone = model.close(tab)
            assert (gone is not None) == (before[url_of_renderer(before, tab)] == {tab})
            if gone is not None:
                released.add(gone)
            del url_of[tab]
        elif op == "assign" and tab not in url_of:
            a = model.assign(tab, url)
            assert (a.moved, a.left, a.released) == (False, None, None)
            check_placement(model, a, before, url, limit, per)
            url_of[tab] = url
        elif op == "navigate" and tab in url_of:
            was_in = url_of_renderer(before, tab)
            a = model.navigate(tab, url)
            cross_site = site_of(url) != site_of(url_of[tab])
            assert a.moved == cross_site
            if cross_site:
                assert a.left == was_in
                assert a.released == (was_in if before[was_in] == {tab} else None)
                if a.released is not None:
                    released.add(a.released)
                    del before[a.released]
                before = {rid: tabs - {tab} for rid, tabs in before.items()}
                check_placement(model, a, before, url, limit, per)
            else:
                assert (a.renderer, a.new, a.left, a.released) == (was_in, False, None, None)
            url_of[tab] = url

        locks = model.locks()
        for rid, lock in locks.items():
            assert rid not in released
            assert lock_ever.setdefault(rid, lock) == lock
            assert model.tabs_of(rid)
        for t, u in url_of.items():
            assert locks[model.renderer_of(t)].allows(u)
        assert sum(len(model.tabs_of(rid)) for rid in locks) == len(url_of)


def url_of_renderer(renderers: dict[int, frozenset[int]], tab: int) -> int:
    (rid,) = (rid for rid, tabs in renderers.items() if tab in tabs)
    return rid


def check_placement(
    model: ProcessModel,
    a: Assignment,
    before: dict[int, frozenset[int]],
    url: str,
    limit: int,
    per: int,
) -> None:
    """`before`: the renderers and their tabs just before the tab was placed."""
    site = site_of(url)
    assert a.lock.site == site == model.lock_of(a.renderer).site
    same_site = {rid: len(tabs) for rid, tabs in before.items() if model.lock_of(rid).site == site}
    if a.new:
        assert a.renderer not in before
        assert len(before) < limit or not same_site
        assert all(load >= per for load in same_site.values())
    else:
        assert a.renderer in same_site
        assert same_site[a.renderer] == min(same_site.values())
        assert same_site[a.renderer] < per or len(before) >= limit
