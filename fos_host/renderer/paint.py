"""Painting: the visible part of a layout into a caller's RGBA buffer (the shared frame).

Pillow draws into an image of its own and the result is copied into the buffer once: an
image made over a foreign buffer (`Image.frombuffer`) is read-only to Pillow, which would
copy it on the first draw anyway. Only lines that intersect the viewport are drawn.

Colours are a browser's defaults: white page, black text, links #0000EE and underlined.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image, ImageDraw

from fos_host.renderer.layout import PAD, ControlBox, Layout, TextRun, cell, drawable, font

Colour = tuple[int, int, int, int]
WHITE: Colour = (255, 255, 255, 255)
BLACK: Colour = (0, 0, 0, 255)
LINK: Colour = (0, 0, 238, 255)
BORDER: Colour = (118, 118, 118, 255)
BUTTON: Colour = (233, 233, 237, 255)


def frame_size(width: int, height: int) -> int:
    """Bytes of an RGBA frame."""
    return width * height * 4


def paint(
    layout: Layout,
    scroll_y: int,
    into: memoryview | bytearray,
    width: int,
    height: int,
    form: Mapping[str, str] | None = None,
) -> None:
    """Paint the `width` x `height` viewport at `scroll_y` into the first `frame_size` bytes of
    `into` (row-major RGBA). Controls show `form`'s values where it has their key."""
    size = frame_size(width, height)
    view = memoryview(into).cast("B")
    if len(view) < size:
        raise ValueError(f"frame buffer of {len(view)} bytes; {width}x{height} needs {size}")
    image = Image.new("RGBA", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    for line in layout.visible(scroll_y, height):
        for item in line.items:
            if isinstance(item, TextRun):
                _text(image, draw, item, item.y - scroll_y)
            else:
                _control(draw, item, item.y - scroll_y, form or {})
    view[:size] = image.tobytes()


def to_png(buffer: memoryview | bytes | bytearray, width: int, height: int) -> bytes:
    """An RGBA frame as PNG (the host's screenshots). The frame is copied first, so a frame
    painted meanwhile cannot tear the picture inside Pillow."""
    frame = bytes(memoryview(buffer).cast("B")[: frame_size(width, height)])
    out = io.BytesIO()
    Image.frombytes("RGBA", (width, height), frame).save(out, "PNG")
    return out.getvalue()


def _text(image: Image.Image, draw: ImageDraw.ImageDraw, run: TextRun, top: int) -> None:
    colour = LINK if run.href else BLACK
    strikes = (0, 1) if run.bold else (0,)
    if run.scale == 1:
        for dx in strikes:
            draw.text((run.x + dx, top), run.text, font=font(), fill=colour)
    else:
        cw, ch = cell()
        mask = Image.new("L", (len(run.text) * cw, ch), 0)
        ImageDraw.Draw(mask).text((0, 0), run.text, font=font(), fill=255)
        mask = mask.resize((mask.width * run.scale, ch * run.scale), Image.Resampling.NEAREST)
        for dx in strikes:
            image.paste(colour, (run.x + dx, top), mask)
    if run.href:
        under = top + run.height
        draw.rectangle((run.x, under, run.x + run.width - 1, under + run.scale - 1), fill=colour)


def _control(draw: ImageDraw.ImageDraw, box: ControlBox, top: int, form: Mapping[str, str]) -> None:
    c = box.control
    x0, y0, x1, y1 = box.x, top, box.x + box.width - 1, top + box.height - 1
    value = form.get(c.key, c.value) if c.key else c.value
    if c.kind in ("checkbox", "radio"):
        checked = value == c.value if c.key in form else c.checked
        shape = draw.ellipse if c.kind == "radio" else draw.rectangle
        shape((x0, y0, x1, y1), fill=WHITE, outline=BORDER)
        if checked:
            shape((x0 + 3, y0 + 3, x1 - 3, y1 - 3), fill=BLACK)
        return
    draw.rectangle((x0, y0, x1, y1), fill=BUTTON if c.kind == "button" else WHITE, outline=BORDER)
    cw, ch = cell()
    cols = max(0, (box.width - 2 * PAD) // cw)
    if c.kind == "select":
        labels = dict(c.options)
        _label(draw, x0 + PAD, y0 + PAD, labels.get(value, value)[: max(0, cols - 2)])
        _label(draw, x1 - PAD - cw + 1, y0 + PAD, "v")
        return
    if c.kind == "button":
        _label(draw, x0 + PAD + cw, y0 + PAD, value[: max(0, cols - 2)])
        return
    if c.kind == "password":
        value = "*" * len(value)
    for row, text in enumerate(value.split("\n")[: c.rows]):
        _label(draw, x0 + PAD, y0 + PAD + row * ch, text[:cols])


def _label(draw: ImageDraw.ImageDraw, x: int, y: int, text: str) -> None:
    draw.text((x, y), drawable(text), font=font(), fill=BLACK)
