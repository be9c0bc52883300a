"""fos_host.renderer as a library: extraction, hostile pages within the limits, layout,
painting into a caller's buffer, a golden image, and snapshot/restore.

Set FOS_UPDATE_GOLDEN=1 to rewrite tests/unit/golden/page.png after a deliberate change to
layout or painting (and look at the new image before committing it).
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fos_host.errors import FosError
from fos_host.renderer import dom
from fos_host.renderer.layout import MARGIN, MAX_LINES, TextRun, cell, layout
from fos_host.renderer.page import SNAPSHOT_VERSION, BadSnapshot, Page
from fos_host.renderer.paint import frame_size, to_png

GOLDEN = Path(__file__).parent / "golden" / "page.png"
URL = "http://demo.example/dir/index.html"
WHITE = b"\xff\xff\xff\xff"

DEMO = b"""<!doctype html><html><head><title>fOS demo page</title></head><body>
<h1>Hello, fOS</h1>
<p>This page is rendered by the <b>reference renderer</b>: a bitmap font, word wrapping,
and <a href="/about">links in blue</a>. Characters outside Latin-1 show as ? like &#x4e2d;.</p>
<h3>A list</h3>
<ul><li>one</li><li>two, a longer item that has to wrap onto a second line at this width</li></ul>
<ol><li>first<li>second</ol>
<pre>  pre  formatted
    text</pre>
<form><input name=q value="search me"> <input type=checkbox name=c checked>
<input type=radio name=r value=a> <input type=radio name=r value=b checked>
<select name=s><option value=1>One<option selected value=2>Two</select>
<input type=submit value=Go><br>
<textarea name=t cols=12>hello
there</textarea> <input type=password name=pw value=secret></form>
<h2>Heading two</h2><p>The end.</p>
</body></html>"""
DEMO_VIEWPORT = (320, 480)


def frame(page: Page) -> bytearray:
    width, height = page.viewport
    buf = bytearray(frame_size(width, height))
    page.paint(buf)
    return buf


def pixels(buf: bytes | bytearray, width: int) -> list[list[bytes]]:
    """Rows of 4-byte pixels."""
    row = width * 4
    return [
        [bytes(buf[y * row + x * 4 : y * row + x * 4 + 4]) for x in range(width)]
        for y in range(len(buf) // row)
    ]


def ink(buf: bytes | bytearray, width: int, height: int) -> int:
    """How many pixels are not white."""
    gray = Image.frombytes("RGBA", (width, height), bytes(buf)).convert("L")
    return sum(gray.histogram()[:255])


def depth(root: dom.Element) -> int:
    deepest, stack = 0, [(root, 1)]
    while stack:
        el, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in el.children if isinstance(c, dom.Element))
    return deepest


def count_nodes(root: dom.Element) -> int:
    n, stack = 0, [root]
    while stack:
        el = stack.pop()
        n += 1 + sum(isinstance(c, dom.Text) for c in el.children)
        stack.extend(c for c in el.children if isinstance(c, dom.Element))
    return n


# ---- extraction --------------------------------------------------------------------------


def test_title_links_and_text() -> None:
    page = Page.load(
        URL,
        b"""<html><head><title>  A   <b>small</b>
        page </title><style>p { color: red }</style><script>var hidden = 1</script></head>
        <body><h1>Heading</h1><p>First <a href="other.html">relative</a>,
        <a href="/root#frag">rooted</a>, <a href="//cdn.example/x">scheme-relative</a>,
        <a href="https://else.example/">absolute</a>, <a href="javascript:alert(1)">js</a>,
        <a href=" JavaScript:alert(2)">js too</a>, <a href="mailto:a@b.example">mail</a>,
        <a href="data:text/html,x">data</a>, <a href="http://[::1">broken</a>,
        <a href="other.html">again</a>.</p>
        <div>div one<div>nested div</div>tail</div>line<br>break
        <ul><li>item one<li>item two</ul>
        <table><tr><td>cell a<td>cell b</tr><tr><td>cell c</table>
        <template><div>template text <a href="/t">t</a></div></template>
        <div hidden>hidden text</div><noscript>no script</noscript>
        <svg><title>svg title</title><text>svg text</text></svg>
        </body></html>""",
    )
    assert page.title == "A <b>small</b> page"  # <title> is text only: no tags inside
    assert page.links == (
        "http://demo.example/dir/other.html",
        "http://demo.example/root#frag",
        "http://cdn.example/x",
        "https://else.example/",
    )
    assert page.text.split("\n") == [
        "Heading",
        "First relative, rooted, scheme-relative, absolute, js, js too, mail, data, broken, again.",
        "div one",
        "nested div",
        "tail",
        "line",
        "break",
        "item one",
        "item two",
        "cell a cell b",
        "cell c",
        "no script svg text",  # both inline: noscript shows (no scripts here), svg text too
    ]
    assert page.truncated == ()


def test_base_href_and_links_in_javascript_text_are_not_links() -> None:
    page = Page.load(
        "https://a.example/x/y",
        b'<base href="https://b.example/base/"><a href="page">p</a><a href="javascript:x">j</a>'
        b'<a href="https://a.example/abs">a</a><a href="page">dup</a>',
    )
    assert page.links == ("https://b.example/base/page", "https://a.example/abs")


def test_whitespace_pre_and_non_latin1() -> None:
    page = Page.load(
        URL,
        "<p>  spaced \t\n out\xa0here </p><pre>\n  keep   this\n\tand tabs\n</pre><p>中文 ok</p>"
        "".encode(),
        charset="utf-8",
    )
    assert page.text == "spaced out\xa0here\n  keep   this\n\tand tabs\n中文 ok"
    runs = [i for line in page.layout.lines for i in line.items if isinstance(i, TextRun)]
    assert [r.text for r in runs][-1] == "?? ok"  # the bitmap font has Latin-1 only


def test_charset_from_http_and_from_meta() -> None:
    text = "café"
    assert Page.load(URL, f"<p>{text}".encode()).text == "cafÃ©"  # windows-1252 by default
    assert Page.load(URL, f"<p>{text}".encode(), charset="utf-8").text == text
    assert Page.load(URL, f'<meta charset="utf-8"><p>{text}'.encode()).text == text


def test_form_state() -> None:
    page = Page.load(
        URL,
        b"""<form><input name=q value="query"><input id=byid value=x><input value=anon>
        <input type=checkbox name=c1 checked><input type=checkbox name=c2 value=yes>
        <input type=radio name=r value=a><input type=radio name=r value=b checked>
        <select name=s><option>first<option value=2 selected>second</select>
        <select name=empty></select><textarea name=t>multi
line</textarea><input type=hidden name=h value=tok><input type=submit name=go value=Go>
        <input type=password name=pw value=secret></form>""",
    )
    assert dict(page.form) == {
        "q": "query",
        "byid": "x",
        "c1": "on",
        "c2": "",
        "r": "b",
        "s": "2",
        "empty": "",
        "t": "multi\nline",
        "pw": "secret",
    }
    page.set_form_value("q", "changed")
    page.set_form_value("c2", "yes")
    assert page.form["q"] == "changed"
    assert page.form["c2"] == "yes"
    with pytest.raises(KeyError, match="h"):
        page.set_form_value("h", "hidden inputs are not user state")
    with pytest.raises(TypeError):
        page.form["q"] = "read-only view"  # type: ignore[index]


# ---- hostile pages -----------------------------------------------------------------------


def test_deep_nesting_is_cut_at_the_depth_limit() -> None:
    n = 100_000
    page = Page.load(URL, b"<p>before</p>" + b"<div>" * n + b"deep" + b"</div>" * n)
    assert page.truncated == (f"elements nested more than {dom.MAX_DEPTH} deep",)
    assert depth(page.root) <= dom.MAX_DEPTH
    assert page.text == "before"
    restored = Page.restore(page.snapshot())  # a DOM at the depth limit round-trips
    assert depth(restored.root) == depth(page.root)
    assert restored.truncated == page.truncated


def test_five_megabyte_text_node() -> None:
    body = ("lorem ipsum " * 500_000).encode()  # 6 MB of words
    word = b"x" * 5_000_000  # and one 5 MB word
    for text in (body, word):
        page = Page.load(URL, b"<p>" + text + b"</p>", viewport=(1024, 600))
        assert page.truncated == ()
        assert page.text == text.decode().strip()
        cols = (1024 - 2 * MARGIN) // cell()[0]
        assert page.height > len(text) // cols * cell()[1]
        page.scroll_to(page.height // 2)
        assert ink(frame(page), 1024, 600) > 0.05 * 1024 * 600  # text all over the middle


def test_layout_stops_at_max_lines() -> None:
    page = Page.load(URL, b"<p>" + b"a " * 300_000, viewport=(60, 100))  # 4 words a line
    assert page.truncated == (f"more than {MAX_LINES} lines",)
    assert len(page.layout.lines) == MAX_LINES
    assert page.scroll_to(10**9) == page.height - 100


def test_node_budget() -> None:
    page = Page.load(URL, b"<b>x</b>" * 150_000 + b"&amp;" * 100_000 + b"</x>" * 100_000)
    assert page.truncated == (f"more than {dom.MAX_NODES} nodes, comments and parse errors",)
    assert count_nodes(page.root) <= dom.MAX_NODES


def test_input_size_limit() -> None:
    parsed = dom.parse(b"<p>" + b"y" * (dom.MAX_HTML_BYTES + 100))
    assert parsed.truncated == f"larger than {dom.MAX_HTML_BYTES >> 20} MiB"
    assert len(dom.extract(parsed.root, URL).text) == dom.MAX_HTML_BYTES - 3


@pytest.mark.parametrize(
    "html",
    [
        b"<b><i>misnested</b> formatting</i><p><table>in<tr>table<td>cell</p></table>",
        b"<table>" + b"<b>foster</b>" * 20_000,
        b"<a href=x><div>block in link</a> after",
        b"".join(b"<b id=%d>" % i for i in range(3000)) + b"<p>x" * 1000,
        b"<select>" + b"<option>x" * 20_000,
        b"<!-- unterminated comment",
        b"<x " + b" ".join(b"a%d=1" % i for i in range(2000)) + b">",
        b"\x00\xff\xfe<\x00p>nul\x00 and invalid utf-8 \xc3\x28</p>",
        b"<<<>>>&&&;;;&#0;&#xd800;&#x110000;&#99999999999;</></>",
        b"<svg><foreignObject><p>html in svg</p></foreignObject><math><mi>x</mi></math>",
        bytes(random.Random(7).randrange(256) for _ in range(200_000)),
    ],
    ids=[
        "misnested",
        "foster",
        "adoption",
        "formatting",
        "options",
        "comment",
        "attributes",
        "garbage-bytes",
        "entities",
        "foreign",
        "random",
    ],
)
def test_malformed_html(html: bytes) -> None:
    page = Page.load(URL, html, viewport=(200, 100))
    frame(page)
    assert depth(page.root) <= dom.MAX_DEPTH
    restored = Page.restore(page.snapshot())
    assert restored.text == page.text


@settings(max_examples=200, database=None, deadline=None)
@given(st.binary(max_size=2000) | st.text(alphabet="<>/=\"'&;#abpdivtrx \n", max_size=500))
def test_any_input_parses_and_paints(data: bytes | str) -> None:
    html = data.encode() if isinstance(data, str) else data
    page = Page.load(URL, html, viewport=(100, 50))
    frame(page)
    assert Page.restore(page.snapshot()).text == page.text


# ---- layout and scrolling ----------------------------------------------------------------

WORDS = " ".join(f"word{n}" for n in range(60))


@pytest.mark.parametrize("width", [320, 800])
def test_wrapping(width: int) -> None:
    blocks = dom.extract(dom.parse(f"<p>{WORDS}</p>".encode()).root, URL).blocks
    lay = layout(blocks, width)
    cols = (width - 2 * MARGIN) // cell()[0]
    lines = [" ".join(r.text for r in line.items if isinstance(r, TextRun)) for line in lay.lines]
    assert " ".join(lines) == WORDS  # no word lost, none split
    assert all(len(line) <= cols for line in lines)
    assert all(
        len(line) + 1 + len(nxt.split(" ")[0]) > cols for line, nxt in itertools.pairwise(lines)
    )  # greedy: the next line's first word would not have fitted
    assert all(r.x + r.width <= width - MARGIN for line in lay.lines for r in line.items)
    assert lay.height == MARGIN + len(lines) * lay.lines[0].height + MARGIN
    assert [line.y for line in lay.lines] == sorted({line.y for line in lay.lines})


def test_narrow_wrapping_breaks_long_words_and_heading_scale() -> None:
    content = dom.extract(dom.parse(b"<h1>Big</h1><p>abcdefghijklmnopqrstuvwxyz</p>").root, URL)
    lay = layout(content.blocks, 2 * MARGIN + 10 * cell()[0])  # room for 10 characters
    runs = [r for line in lay.lines for r in line.items if isinstance(r, TextRun)]
    texts = [(r.text, r.scale, r.bold) for r in runs]
    assert texts[0] == ("Big", 2, True)
    assert [t for t, _, _ in texts[1:]] == ["abcdefghij", "klmnopqrst", "uvwxyz"]


def test_scroll_clamps() -> None:
    page = Page.load(URL, b"<p>" + b"line<br>" * 200, viewport=(300, 200))
    assert page.height > 200 * cell()[1]
    assert page.scroll_to(-50) == 0
    assert page.scroll_to(1000) == 1000
    assert page.scroll_to(10**9) == page.height - 200 == page.scroll_y
    short = Page.load(URL, b"<p>short", viewport=(300, 200))
    assert short.scroll_to(100) == 0


# ---- painting ----------------------------------------------------------------------------


def test_paint_writes_into_the_given_buffer() -> None:
    width, height = 200, 120
    page = Page.load(URL, b"<p>Hello painted world</p>", viewport=(width, height))
    backing = bytearray(b"\x00" * (frame_size(width, height) + 64))  # larger than needed
    page.paint(memoryview(backing))
    assert backing[frame_size(width, height) :] == b"\x00" * 64  # nothing past the frame
    rows = pixels(backing[: frame_size(width, height)], width)
    line = page.layout.lines[0]
    run = line.items[0]
    assert isinstance(run, TextRun)
    inked = {(x, y) for y, row in enumerate(rows) for x, px in enumerate(row) if px != WHITE}
    assert inked  # the text is there…
    assert all(
        run.x <= x < run.x + run.width and run.y <= y < run.y + run.height for x, y in inked
    )  # …only where the text run is
    assert all(rows[y][x][:3] == b"\x00\x00\x00" for x, y in inked)  # black on white
    with pytest.raises(ValueError, match="needs"):
        page.paint(bytearray(frame_size(width, height) - 1))


def test_links_are_blue_and_underlined() -> None:
    page = Page.load(URL, b'<p><a href="/x">link</a></p>', viewport=(100, 40))
    rows = pixels(frame(page), 100)
    run = page.layout.lines[0].items[0]
    assert isinstance(run, TextRun) and run.href == "http://demo.example/x"
    underline = rows[run.y + run.height]
    assert all(underline[x] == b"\x00\x00\xee\xff" for x in range(run.x, run.x + run.width))
    assert {px for row in rows for px in row} == {WHITE, b"\x00\x00\xee\xff"}


def test_scrolling_moves_the_picture() -> None:
    """Scrolled 3 pixels further, the frame is the previous one moved up by 3 rows, all the way
    down the page: whatever the viewport's edges cut (scaled headings, boxes, underlines) is
    cut cleanly."""
    width, height, step = 240, 120, 3
    page = Page.load(URL, DEMO, viewport=(width, height))
    row = width * 4
    before = frame(page)
    for y in range(step, page.layout.max_scroll(height) + 1, step):
        assert page.scroll_to(y) == y
        now = frame(page)
        assert now[: (height - step) * row] == before[step * row :], f"scrolled to {y}"
        before = now


def test_form_values_are_painted() -> None:
    page = Page.load(URL, b"<input name=q value=before>", viewport=(200, 40))
    before = frame(page)
    page.set_form_value("q", "after")
    assert frame(page) != before
    page.set_form_value("q", "before")
    assert frame(page) == before


def test_golden_image(tmp_path: Path) -> None:
    page = Page.load(URL, DEMO, viewport=DEMO_VIEWPORT)
    png = to_png(frame(page), *DEMO_VIEWPORT)
    if os.environ.get("FOS_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(png)
    (tmp_path / "page.png").write_bytes(png)
    with Image.open(GOLDEN) as golden:
        assert golden.size == DEMO_VIEWPORT
        want = golden.convert("RGBA").tobytes()
    with Image.open(tmp_path / "page.png") as got:
        have = got.convert("RGBA").tobytes()
    differing = sum(
        max(abs(a - b) for a, b in zip(have[i : i + 4], want[i : i + 4], strict=True)) > 16
        for i in range(0, len(have), 4)
    )
    assert differing <= 0.01 * DEMO_VIEWPORT[0] * DEMO_VIEWPORT[1], (
        f"{differing} pixels differ from {GOLDEN}; the new picture is in {tmp_path}"
    )


# ---- snapshot and restore ----------------------------------------------------------------


def test_snapshot_round_trip() -> None:
    page = Page.load(URL, DEMO, viewport=(320, 200))
    page.set_form_value("q", "typed")
    page.set_form_value("r", "a")
    page.set_form_value("c", "")
    page.set_form_value("pw", "typed secret")
    page.scroll_to(55)
    data = page.snapshot()
    assert len(data) < 2048  # the demo page's snapshot is about 1 KiB
    assert b"typed secret" not in data  # passwords stay out of snapshots
    restored = Page.restore(data)
    assert restored.url == page.url
    assert restored.viewport == page.viewport
    assert restored.title == page.title
    assert restored.links == page.links
    assert restored.text == page.text
    assert restored.scroll_y == 55
    assert dict(restored.form) == {**page.form, "pw": "secret"}
    assert dom.to_records(restored.root) == dom.to_records(page.root)
    page.set_form_value("pw", "secret")
    assert frame(restored) == frame(page)
    assert Page.restore(restored.snapshot()).snapshot() == restored.snapshot()


def test_restore_does_not_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    data = Page.load(URL, DEMO).snapshot()

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("restore parsed HTML")

    monkeypatch.setattr(dom, "parse", no_parsing)
    assert Page.restore(data).title == "fOS demo page"


def state(**changes: object) -> bytes:
    """The demo page's snapshot with some fields changed."""
    fields = msgpack.unpackb(Page.load(URL, DEMO).snapshot())
    fields.update(changes)
    return bytes(msgpack.packb(fields))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a page snapshot"),
        (b"garbage", "not a page snapshot"),
        (b"\x80\x03cos\nsystem\nq\x00.", "not a page snapshot"),  # a pickle
        (msgpack.packb([1, 2, 3]), "not a page snapshot"),
        (msgpack.packb({"format": "other"}), "not a page snapshot"),
        (b"\x91" * 100_000, "not a page snapshot"),  # nested arrays
        (state(version=SNAPSHOT_VERSION + 1), "version 2; this renderer restores version 1"),
        (state(version="1"), "version '1'"),
        (state(extra=1), "fields"),
        (state(url=7), "url"),
        (state(viewport=[0, 10]), "viewport"),
        (state(viewport=[100]), "viewport"),
        (state(scroll="top"), "scroll"),
        (state(form={"q": 1}), "form"),
        (state(form={b"q": "x"}), "form"),
        (state(version="v" * 10_000), "version 'vvv"),
        (state(form={"nosuch": "x"}), "names no control"),
        (state(truncated=3), "truncation"),
        (state(dom=[]), "damaged"),
        (state(dom=["text first"]), "damaged"),
        (state(dom=[["html", {}, 2], "only one child"]), "ends inside an element"),
        (state(dom=[["html", {}, 0], "extra"]), "after the root's last child"),
        (state(dom=[["html", {"a": 1}, 0]]), "attribute"),
        (state(dom=[["html", {}, -1]]), "damaged"),
        (state(dom=[["div", {}, 1]] * (dom.MAX_DEPTH + 1) + ["x"]), "nested more than"),
        (state(dom=["x"] * (dom.MAX_NODES + 1)), "DOM nodes"),
    ],
)
def test_restore_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(BadSnapshot, match=reason.replace("(", r"\(")) as e:
        Page.restore(data)
    assert isinstance(e.value, FosError)


def test_truncated_snapshots_are_rejected() -> None:
    data = Page.load(URL, DEMO).snapshot()
    for n in range(0, len(data), 7):
        with pytest.raises(BadSnapshot):
            Page.restore(data[:n])


@settings(max_examples=300, database=None, deadline=None)
@given(st.data())
def test_damaged_snapshots_restore_or_fail_cleanly(data: st.DataObject) -> None:
    snap = bytearray(Page.load(URL, DEMO, viewport=(120, 80)).snapshot())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(snap) - 1))
        snap[at] = data.draw(st.integers(0, 255))
    try:
        page = Page.restore(bytes(snap))
    except BadSnapshot:
        return
    if page.viewport[0] * page.viewport[1] <= 1 << 20:
        frame(page)


# ---- the sandbox -------------------------------------------------------------------------

NO_IMPORTS_AFTER_PRELOAD = """
import sys
from fos_host.renderer.page import Page, preload
preload()
events = []
sys.addaudithook(lambda event, args: events.append((event, args[0]))
                 if event in ("open", "import", "ctypes.dlopen") else None)
for html, charset in [(b"<p>utf-8", "utf-8"), (b"<meta charset=shift_jis><p>x", None),
                      (b"<p>x", "iso-8859-2"), ("<h1>\u00e9</h1><input name=q>".encode(), None)]:
    page = Page.load("http://a.example/", html, (100, 50), charset=charset)
    page.paint(bytearray(100 * 50 * 4))
    Page.restore(page.snapshot()).paint(bytearray(100 * 50 * 4))
print(events)
"""


def test_preload_leaves_nothing_to_load_in_the_sandbox() -> None:
    """After `preload` (the zygote's), loading, painting, snapshotting and restoring pages in
    any encoding opens no file and imports nothing: the sandbox has no files to open."""
    done = subprocess.run(
        [sys.executable, "-c", NO_IMPORTS_AFTER_PRELOAD],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == "[]"


def test_the_zygote_warm_up_leaves_no_fd_or_thread_behind() -> None:
    """`warm_up` runs in the zygote before it forks: what it opens must be closed (a renderer
    would inherit it) and it must not start a thread (forking a threaded process is unsafe)."""
    import threading

    from fos_host.renderer.main import warm_up
    from fos_host.sandbox.zygote import RENDERER_PRELOAD

    assert "fos_host.renderer.main:warm_up" in RENDERER_PRELOAD
    fds = sorted(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    warm_up()
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads
