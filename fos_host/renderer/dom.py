"""HTML into a small DOM of our own, and what the renderer needs from it.

`parse` runs html5lib (the HTML standard's tree construction, pure Python: it works inside the
sandbox) with a tree builder of our own, so html5lib's tree never exists: the result is plain
`Element`/`Text` dataclasses, which are what a snapshot stores and a restore rebuilds.

A hostile page must not exhaust the renderer, so parsing has three limits, and a page that hits
one is cut there — what was built so far is kept, and `Parsed.truncated` says which limit:

- `MAX_HTML_BYTES` of input;
- `MAX_DEPTH` open elements: html5lib scans its stack of open elements for most tags, so
  nesting costs O(depth) per tag (100 000 nested divs would take minutes), and a deep tree
  would overflow every recursive walk — ours are all iterative anyway;
- `MAX_NODES` units of work: every element, text insertion, comment and parse error costs
  one, so the DOM's size and the parse's time are both bounded (entities, stray end tags and
  comments cost html5lib 1-3 µs a byte; plain text 0.06).

html5lib 1.1 predates `<template>`: it is an ordinary element to it, so its content is in
the DOM as children (not shown), and a `<p>` left open inside it swallows the rest of the page.

One cost is not bounded: html5lib compares each attribute of a tag with all earlier ones, so a
single tag with 30 000 attributes takes seconds. The renderer's CPU limit and the host's hang
check are the backstop for that.

`extract` walks the DOM once for the title, the links, the text blocks to lay out (with their
form controls) and the form's initial state. CSS is not applied: block elements break lines,
`hidden` hides, and that is all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urljoin, urlsplit

import html5lib
from html5lib.treebuilders import base as _h5base

MAX_HTML_BYTES = 8 << 20
"""Input beyond this is not parsed (a 5 MB text node fits)."""
MAX_DEPTH = 256
"""Open elements at once; Chromium's parser stops nesting at 512."""
MAX_NODES = 200_000
"""The parse's work budget (see the module docstring); also the most nodes a DOM can have."""

_HTML_NS = "http://www.w3.org/1999/xhtml"
_FOREIGN_PREFIX = {
    "http://www.w3.org/2000/svg": "svg:",
    "http://www.w3.org/1998/Math/MathML": "math:",
}
_TO_SPACE = str.maketrans("\t\n\r\f", "    ")  # HTML's whitespace: not \s, which has U+00A0
_URL_STRIP = " \t\n\r\f\0"


# --------------------------------------------------------------------------------------
# the DOM


@dataclass(slots=True)
class Text:
    """A run of character data (adjacent runs are merged)."""

    data: str


@dataclass(slots=True)
class Element:
    """An element. `tag` is lower case; SVG and MathML elements carry an `svg:`/`math:` prefix
    so they never pass for HTML ones (an SVG `<title>` is not the page title)."""

    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)


Node = Element | Text


@dataclass(slots=True)
class Parsed:
    """The DOM's root (always an `html` element) and the limit the page hit, if any."""

    root: Element
    truncated: str | None


def iter_elements(root: Element) -> Iterator[Element]:
    """Every element in document order, iteratively (a DOM may be `MAX_DEPTH` deep)."""
    stack = [root]
    while stack:
        el = stack.pop()
        yield el
        stack.extend(c for c in reversed(el.children) if isinstance(c, Element))


# --------------------------------------------------------------------------------------
# parsing: html5lib with our tree builder


class _Stop(Exception):
    """Ends a parse that hit a limit; html5lib does not catch it, and the tree built so far
    stays in the builder."""


class _BuildText:
    """Text while parsing: html5lib inserts it a token at a time (each entity is one), and
    appending to a str attribute would copy it every time."""

    def __init__(self, data: str) -> None:
        self.parent: _BuildNode | None = None
        self.pieces = [data]


class _BuildNode(_h5base.Node):
    """An element (or the document) as html5lib's tree construction sees it."""

    def __init__(self, name: str, namespace: str | None) -> None:
        super().__init__(name)
        self.namespace = namespace
        self.childNodes: list[_BuildNode | _BuildText] = []

    @property
    def nameTuple(self) -> tuple[str, str]:
        return (self.namespace or _HTML_NS, self.name)

    def appendChild(self, node: _BuildNode | _BuildText) -> None:
        node.parent = self
        self.childNodes.append(node)

    def insertText(self, data: str, insertBefore: _BuildNode | None = None) -> None:
        kids = self.childNodes
        at = len(kids) if insertBefore is None else self._index(insertBefore)
        before = kids[at - 1] if at else None
        if isinstance(before, _BuildText):
            before.pieces.append(data)
        else:
            text = _BuildText(data)
            text.parent = self
            kids.insert(at, text)

    def insertBefore(self, node: _BuildNode, refNode: _BuildNode) -> None:
        node.parent = self
        self.childNodes.insert(self._index(refNode), node)

    def _index(self, child: _BuildNode) -> int:
        """Where `child` is, searched from the end: html5lib inserts before an open table
        (foster parenting), which is its parent's last child; `list.index` from the front
        made a page of 100 000 misnested tags take 15 s."""
        kids = self.childNodes
        for i in range(len(kids) - 1, -1, -1):
            if kids[i] is child:
                return i
        raise ValueError("html5lib: insertion before a node that is not a child")

    def removeChild(self, node: _BuildNode) -> None:
        self.childNodes.remove(node)
        node.parent = None

    def cloneNode(self) -> _BuildNode:
        clone = _BuildNode(self.name, self.namespace)
        clone.attributes = dict(self.attributes)
        return clone

    def hasContent(self) -> bool:
        return bool(self.childNodes)


class _Builder(_h5base.TreeBuilder):
    """html5lib's tree builder interface, building `_BuildNode`s and spending the budget.
    Comments and the doctype are counted but not kept: nothing renders them."""

    def reset(self) -> None:
        self.spent = 0  # a reparse (the page declared another encoding) starts afresh
        super().reset()

    def spend(self) -> None:
        self.spent += 1
        if self.spent > MAX_NODES:
            raise _Stop(f"more than {MAX_NODES} nodes, comments and parse errors")

    def documentClass(self) -> _BuildNode:
        return _BuildNode("#document", None)

    def elementClass(self, name: str, namespace: str | None = None) -> _BuildNode:
        self.spend()
        if len(self.openElements) >= MAX_DEPTH:
            raise _Stop(f"elements nested more than {MAX_DEPTH} deep")
        return _BuildNode(name, namespace)

    def insertText(self, data: str, parent: _BuildNode | None = None) -> None:
        self.spend()
        super().insertText(data, parent)

    def insertComment(self, token: dict[str, Any], parent: _BuildNode | None = None) -> None:
        self.spend()

    def insertDoctype(self, token: dict[str, Any]) -> None:
        self.spend()


class _Parser(html5lib.HTMLParser):
    """Counts parse errors against the budget instead of keeping them: html5lib lists every
    one, and a hostile page has millions."""

    def parseError(self, errorcode: str = "", datavars: object = None) -> None:
        self.tree.spend()


def parse(html: bytes, charset: str | None = None) -> Parsed:
    """Parse a page's bytes. `charset` is the one the HTTP Content-Type declared; without it
    html5lib sniffs (BOM, `<meta charset>`) and falls back to windows-1252, as browsers do —
    never to chardet's guess, which would make the result depend on whether chardet happens
    to be installed (and the import attempt would search the sandbox's missing files)."""
    truncated = None
    if len(html) > MAX_HTML_BYTES:
        html = html[:MAX_HTML_BYTES]
        truncated = f"larger than {MAX_HTML_BYTES >> 20} MiB"
    parser = _Parser(tree=_Builder, namespaceHTMLElements=False)
    try:
        parser.parse(html, transport_encoding=charset, useChardet=False)
    except _Stop as stop:
        truncated = str(stop)
    return Parsed(_freeze(parser.tree.document), truncated)


def _freeze(document: _BuildNode) -> Element:
    """The builder's tree as our DOM (iteratively: it may be `MAX_DEPTH` deep). Each builder
    node lets go of its children once they are copied, so they are freed as the copy goes on
    (their parent links are not cycles then) instead of both trees peaking together."""
    html = next((c for c in document.childNodes if isinstance(c, _BuildNode)), None)
    if html is None:  # the budget ran out before <html> was created
        return Element("html")
    root = Element(_tag(html), _attrs(html))
    stack = [(html, root)]
    while stack:
        src, dst = stack.pop()
        for child in src.childNodes:
            if isinstance(child, _BuildText):
                data = "".join(child.pieces)
                last = dst.children[-1] if dst.children else None
                if isinstance(last, Text):  # text moved next to text (adoption, reparenting)
                    last.data += data
                elif data:
                    dst.children.append(Text(data))
            else:
                el = Element(_tag(child), _attrs(child))
                dst.children.append(el)
                stack.append((child, el))
        src.childNodes = []
    return root


def _tag(node: _BuildNode) -> str:
    return _FOREIGN_PREFIX.get(node.namespace or _HTML_NS, "") + node.name


def _attrs(node: _BuildNode) -> dict[str, str]:
    # Foreign attributes come as (prefix, local name, namespace) tuples: xlink:href.
    return {
        (f"{k[0]}:{k[1]}" if k[0] else k[1]) if isinstance(k, tuple) else k: v
        for k, v in node.attributes.items()
    }


# --------------------------------------------------------------------------------------
# extraction: title, links, text blocks, form controls


@dataclass(frozen=True, slots=True)
class Span:
    """Inline text of one style. Outside `pre` its whitespace is collapsed to single spaces;
    a "\\n" is a forced line break (`<br>`, or a newline in `pre`)."""

    text: str
    href: str | None = None  # the link's absolute http(s) URL
    bold: bool = False


@dataclass(frozen=True, slots=True)
class Control:
    """A form control, laid out as a box. `key` is its name (else its id; "" for neither: it
    then has no form state and shows its initial value). `value` is the initial text, the
    button label, or the value a checkbox/radio submits when checked."""

    key: str
    kind: str  # text, password, textarea, select, checkbox, radio, button
    value: str = ""
    checked: bool = False
    cols: int = 20
    rows: int = 1
    options: tuple[tuple[str, str], ...] = ()  # a select's (value, label) pairs


@dataclass(frozen=True, slots=True)
class Block:
    """A run of inline content between block boundaries. `level` 1-6 for a heading; `gap`: a
    blank half line before it (a p, heading, list, pre, … starts or ended there); `indent`:
    list and quote nesting; `marker`: a list item's bullet or number."""

    items: tuple[Span | Control, ...]
    level: int = 0
    pre: bool = False
    indent: int = 0
    gap: bool = False
    marker: str = ""

    @property
    def text(self) -> str:
        """The block's text without its controls (a form's row of boxes has none)."""
        text = "".join(i.text for i in self.items if isinstance(i, Span))
        if self.pre:
            return text
        return "\n".join(line.strip(" ") for line in text.split("\n")).strip("\n")


@dataclass(frozen=True, slots=True)
class Content:
    """What the renderer shows and reports of a DOM. `form` is the initial form state: every
    named control's value ("" for an unchecked checkbox or radio group); `passwords` the keys
    whose values must not leave the renderer in a snapshot."""

    title: str
    links: tuple[str, ...]
    blocks: tuple[Block, ...]
    form: dict[str, str]
    passwords: frozenset[str]

    @property
    def text(self) -> str:
        return "\n".join(t for b in self.blocks if (t := b.text))


_SKIP = frozenset(
    {"head", "script", "style", "template", "title", "iframe", "datalist", "option", "optgroup",
     "svg:title", "svg:desc", "svg:style", "svg:script", "svg:metadata"}
)  # fmt: skip
_BLOCK = frozenset(
    {
        "html", "body", "address", "article", "aside", "blockquote", "caption", "center", "dd",
        "details", "dialog", "dir", "div", "dl", "dt", "fieldset", "figcaption", "figure",
        "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hgroup", "hr",
        "legend", "li", "main", "menu", "nav", "ol", "p", "pre", "section", "summary", "table",
        "tbody", "tfoot", "thead", "tr", "ul",
    }
)  # fmt: skip
_GAP = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "pre", "blockquote", "figure",
     "hr", "menu", "dir"}
)  # fmt: skip
_INDENT = frozenset({"ul", "ol", "blockquote", "dd", "menu", "dir"})
_HEADING = {f"h{n}": n for n in range(1, 7)}
_BUTTON_TYPES = {"submit": "Submit", "reset": "Reset", "button": ""}
_NOT_SHOWN_INPUTS = frozenset({"hidden", "file", "image"})


def collapse_spaces(text: str) -> str:
    """Every run of HTML whitespace as one space. Not `re.sub`: on prose it would match every
    space, and a 5 MB text node's million matches took 100 MB while being joined."""
    text = text.translate(_TO_SPACE)
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def absolute_url(base: str, href: str) -> str | None:
    """`href` resolved against `base`, if that makes an http(s) URL with a host: a link the
    host could navigate to. javascript:, data:, mailto: and malformed ones are not links."""
    href = href.strip(_URL_STRIP).replace("\t", "").replace("\n", "").replace("\r", "")
    try:
        url = urljoin(base, href)
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return url


@dataclass(frozen=True, slots=True)
class _Style:
    """What an element passes down to its content."""

    href: str | None = None
    bold: bool = False
    level: int = 0
    pre: bool = False
    indent: int = 0


class _Flow:
    """Collects inline content into blocks, collapsing whitespace across element boundaries
    as a browser does."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.items: list[Span | Control] = []
        self.style = _Style()  # of the block being collected: its first content's
        self.gap = False
        self.marker = ""
        self.line_start = True  # drop leading spaces
        self.space = False  # the last text ended in a space: drop the next one's leading

    def text(self, data: str, style: _Style) -> None:
        if style.pre:
            self._add(Span(data.replace("\r\n", "\n").replace("\r", "\n")), style)
            self.line_start = data.endswith("\n")
            self.space = False
            return
        data = collapse_spaces(data)
        if self.line_start or self.space:
            data = data.lstrip(" ")
        if data:
            self._add(Span(data, style.href, style.bold or style.level > 0), style)
            self.line_start = False
            self.space = data.endswith(" ")

    def line_break(self, style: _Style) -> None:
        self._trim()
        self._add(Span("\n"), style)
        self.line_start, self.space = True, False

    def control(self, control: Control, style: _Style) -> None:
        self._add(control, style)
        self.line_start, self.space = False, False

    def boundary(self, gap: bool = False) -> None:
        """End the block being collected (a block element starts or ends here)."""
        self._trim(block_end=True)
        if self.items:
            s = self.style
            self.blocks.append(
                Block(tuple(self.items), s.level, s.pre, s.indent, self.gap, self.marker)
            )
            self.items, self.gap, self.marker = [], False, ""
        self.gap = self.gap or gap
        self.line_start, self.space = True, False

    def _add(self, item: Span | Control, style: _Style) -> None:
        items = self.items
        if not items:
            self.style = style
        last = items[-1] if items else None
        if (
            isinstance(item, Span)
            and isinstance(last, Span)
            and (last.href, last.bold) == (item.href, item.bold)
        ):
            items[-1] = Span(last.text + item.text, item.href, item.bold)
        else:
            items.append(item)

    def _trim(self, block_end: bool = False) -> None:
        """Drop trailing spaces before a line or block ends (not in `pre`), and a block's
        final line break: `a<br></p>` and `<pre>a\\n</pre>` show no empty line after "a"."""
        if not self.items or not isinstance(last := self.items[-1], Span):
            return
        text = last.text
        if block_end and text.endswith("\n"):
            text = text[:-1]
        if not self.style.pre:
            text = text.rstrip(" ")
        if text:
            self.items[-1] = Span(text, last.href, last.bold)
        else:
            self.items.pop()


def extract(root: Element, url: str) -> Content:
    """Everything the renderer shows and reports of a DOM, in one walk (plus a quick pass
    for the title and `<base href>`, which may come after the links they affect)."""
    title: str | None = None
    base: str | None = None
    for el in iter_elements(root):
        if el.tag == "title" and title is None:
            title = collapse_spaces(_text_of(el)).strip(" ")
        elif el.tag == "base" and "href" in el.attrs and base is None:
            base = absolute_url(url, el.attrs["href"]) or url

    flow = _Flow()
    links: dict[str, None] = {}  # ordered set
    controls: list[Control] = []
    counters: list[int] = []  # one per open ol/ul: the next li's number (0 in a ul)
    stack: list[tuple[Node, _Style] | Element] = [(root, _Style())]  # an Element: leaving it
    while stack:
        entry = stack.pop()
        if isinstance(entry, Element):  # leaving
            if entry.tag in _BLOCK:
                flow.boundary(entry.tag in _GAP)
            if entry.tag in ("ol", "ul", "menu", "dir"):
                counters.pop()
            elif entry.tag == "li":
                flow.marker = ""  # an empty item's marker must not go to the next block
            continue
        node, style = entry
        if isinstance(node, Text):
            flow.text(node.data, style)
            continue
        tag, attrs = node.tag, node.attrs
        if tag in _SKIP or "hidden" in attrs:
            continue
        if tag in ("input", "textarea", "select"):  # (a <button>'s content is shown as text)
            control = _control(node)
            if control is not None:
                controls.append(control)
                flow.control(control, style)
            continue
        if tag == "br":
            flow.line_break(style)
            continue
        if tag in ("td", "th") and not flow.line_start:
            flow.text(" ", style)
        if tag in _BLOCK:
            flow.boundary(tag in _GAP)
        if tag in ("ol", "ul", "menu", "dir"):
            counters.append(_list_start(attrs) if tag == "ol" else 0)
        elif tag == "li":
            if counters and counters[-1]:
                flow.marker = f"{counters[-1]}."
                counters[-1] += 1
            else:
                flow.marker = "*"
        style = _child_style(node, style, base or url, links)
        stack.append(node)
        stack.extend((c, style) for c in reversed(node.children))
    flow.boundary()
    return Content(
        title=title or "",
        links=tuple(links),
        blocks=tuple(flow.blocks),
        form=_initial_form(controls),
        passwords=frozenset(c.key for c in controls if c.kind == "password" and c.key),
    )


def _child_style(el: Element, style: _Style, base: str, links: dict[str, None]) -> _Style:
    """The style `el` gives its content; a link also goes into `links`."""
    tag = el.tag
    if tag in ("a", "area") and "href" in el.attrs:
        href = absolute_url(base, el.attrs["href"])
        if href is not None:
            links[href] = None
        style = replace(style, href=href)
    if tag in ("b", "strong", "th"):
        style = replace(style, bold=True)
    elif tag in _HEADING:
        style = replace(style, level=_HEADING[tag])
    elif tag in ("pre", "listing", "plaintext", "xmp"):
        style = replace(style, pre=True)
    elif tag in _INDENT:
        style = replace(style, indent=style.indent + 1)
    return style


def _list_start(attrs: dict[str, str]) -> int:
    try:
        return max(1, min(int(attrs.get("start", "1")), 1_000_000))
    except ValueError:
        return 1


def _text_of(el: Element) -> str:
    out = []
    stack: list[Node] = [el]
    while stack:
        node = stack.pop()
        if isinstance(node, Text):
            out.append(node.data)
        else:
            stack.extend(reversed(node.children))
    return "".join(out)


def _int_attr(attrs: dict[str, str], name: str, default: int, top: int) -> int:
    try:
        return max(1, min(int(attrs.get(name, "")), top))
    except ValueError:
        return default


def _control(el: Element) -> Control | None:
    """The control an input, textarea or select element shows, if any."""
    attrs = el.attrs
    key = attrs.get("name") or attrs.get("id") or ""
    if el.tag == "textarea":
        return Control(
            key,
            "textarea",
            _text_of(el),
            cols=_int_attr(attrs, "cols", 20, 100),
            rows=_int_attr(attrs, "rows", 2, 10),
        )
    if el.tag == "select":
        elements = [o for o in iter_elements(el) if o.tag == "option"]
        labels = [collapse_spaces(_text_of(o)).strip(" ") for o in elements]
        options = tuple(
            (o.attrs.get("value", label), label) for o, label in zip(elements, labels, strict=True)
        )
        chosen = next(
            (v for o, (v, _) in zip(elements, options, strict=True) if "selected" in o.attrs),
            options[0][0] if options else "",
        )
        width = max(map(len, labels), default=1)
        return Control(key, "select", chosen, cols=max(1, min(width, 40)), options=options)
    kind = attrs.get("type", "text").strip(" \t\n\r\f").lower()
    if kind in _NOT_SHOWN_INPUTS:
        return None
    if kind in _BUTTON_TYPES:
        return Control("", "button", attrs.get("value", _BUTTON_TYPES[kind]))
    if kind in ("checkbox", "radio"):
        return Control(key, kind, attrs.get("value", "on"), checked="checked" in attrs)
    return Control(
        key,
        "password" if kind == "password" else "text",
        attrs.get("value", ""),
        cols=_int_attr(attrs, "size", 20, 100),
    )


def _initial_form(controls: list[Control]) -> dict[str, str]:
    """Named controls' values in document order (the last of a name wins, as its box shows the
    same value); a checkbox or radio group is its checked value or ""."""
    form: dict[str, str] = {}
    for c in controls:
        if not c.key or c.kind == "button":
            continue
        if c.kind in ("checkbox", "radio"):
            if c.checked:
                form[c.key] = c.value
            else:
                form.setdefault(c.key, "")
        else:
            form[c.key] = c.value
    return form


# --------------------------------------------------------------------------------------
# the DOM as flat records (for snapshots)


def to_records(root: Element) -> list[object]:
    """The DOM in document order, flat: an element is `[tag, attrs, number of children]`, a
    text node its string. Flat, so it packs without nesting limits and rebuilds iteratively."""
    out: list[object] = []
    stack: list[Node] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Text):
            out.append(node.data)
        else:
            out.append([node.tag, node.attrs, len(node.children)])
            stack.extend(reversed(node.children))
    return out


def from_records(records: object) -> Element:
    """The DOM `to_records` made, checked as it is rebuilt (the records come from the
    renderer, which is not trusted): `ValueError` naming the first thing wrong."""
    if not isinstance(records, list) or not records:
        raise ValueError("the DOM is not a non-empty list")
    if len(records) > MAX_NODES:
        raise ValueError(f"{len(records)} DOM nodes; at most {MAX_NODES}")
    root, due = _record_element(records[0])
    parents, dues = [root], [due]  # open elements and how many children each still awaits
    for n, record in enumerate(records[1:], 1):
        while dues and not dues[-1]:
            parents.pop()
            dues.pop()
        if not dues:
            raise ValueError(f"DOM node {n} comes after the root's last child")
        dues[-1] -= 1
        if isinstance(record, str):
            parents[-1].children.append(Text(record))
            continue
        el, due = _record_element(record)
        parents[-1].children.append(el)
        if due:
            parents.append(el)
            dues.append(due)
            if len(parents) > MAX_DEPTH:
                raise ValueError(f"DOM nested more than {MAX_DEPTH} deep")
    if any(dues):
        raise ValueError("the DOM ends inside an element")
    return root


def _record_element(record: object) -> tuple[Element, int]:
    if not (
        isinstance(record, list)
        and len(record) == 3
        and isinstance(record[0], str)
        and isinstance(record[1], dict)
        and isinstance(record[2], int)
        and 0 <= record[2] <= MAX_NODES
    ):
        kind = type(record).__name__
        raise ValueError(
            f"a DOM node is a malformed {kind}, not a string or [tag, attrs, children]"
        )
    tag, attrs, children = record
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items()):
        raise ValueError(f"<{tag[:40]}> has an attribute that is not a string")
    return Element(tag, attrs), children
