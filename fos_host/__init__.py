"""fos-host: the process host of the fOS browser."""

__version__ = "0.1.0"
