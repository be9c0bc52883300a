"""`Closing`: the one mixin for objects that own something until `close()`."""

from __future__ import annotations

from typing import Self


class Closing:
    """A context manager whose exit calls `close()` (which subclasses define, idempotent)."""

    def close(self) -> object:  # what it returns, if anything, is the subclass's business
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
