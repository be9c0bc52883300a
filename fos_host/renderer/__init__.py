"""The reference renderer's engine: parse, extract, lay out, paint, snapshot and restore a page."""
