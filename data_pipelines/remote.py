"""fsspec URLs as ``genvis-shards build`` inputs: the row file (``--csv``/``--rows``) and the video folder
(``--video-root``) may be ``memory://``, ``http(s)://``, ``s3://``, ``gs://`` or any other fsspec URL; plain paths
and ``file://`` URLs stay local.

A remote video is never held in memory: the probe copies it in 1 MiB chunks to a temporary file it decodes (FFmpeg
needs to seek), and the shard writer streams it into the tar, so it is read twice. The protocols need their fsspec
packages (``http(s)``: aiohttp; ``s3``: s3fs; ``gs``: gcsfs); a missing one is an error naming it. Zip layouts need a
local ``--video-root``. Checked by ``tests/data/test_remote_inputs.py``.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

_PROTOCOL_PACKAGES = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


class RemoteInputError(ValueError):
    """A URL that cannot be opened at all (no fsspec, or no filesystem package for its protocol)."""


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL read through fsspec (``file://`` and plain paths are local)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | os.PathLike[str]) -> str:
    """A local path without its ``file://`` prefix."""
    return os.fspath(path).removeprefix("file://")


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and in-filesystem path of ``url``.

    Raises:
        RemoteInputError: fsspec, or the package of the URL's protocol, is not installed (named in the message).
    """
    try:
        import fsspec
    except ImportError as error:
        raise RemoteInputError(f"{url}: reading URLs needs the 'fsspec' package (pip install fsspec)") from error
    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        package = _PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol!r}")
        raise RemoteInputError(
            f"{url}: reading {protocol}:// URLs needs {package!r}, which does not import ({error}); "
            f"install it with `pip install {package}`"
        ) from error
    except ValueError as error:
        raise RemoteInputError(f"{url}: not a URL fsspec can open ({error})") from error


def join(root: str, name: str) -> str:
    """``name`` (a relative path with ``/``) under the URL ``root``."""
    return root.rstrip("/") + "/" + name.replace("\\", "/").lstrip("/")


def kind(url: str) -> str | None:
    """``file``, ``directory`` (or another fsspec type), or None when nothing is at ``url``."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return str(info.get("type", "file"))


def open_binary(path: str, sequential: bool = True) -> tuple[BinaryIO, int]:
    """A binary stream of a local path or URL and its size in bytes (-1 when the server does not say; the caller
    closes the stream).

    Args:
        sequential: the caller reads from the start to the end. Over http(s) the stream is then one plain GET
            (``block_size=0``), which also works with servers that ignore range requests; False gives a seekable
            file that reads by ranges (parquet).
    """
    if not is_url(path):
        handle = open(local_path(path), "rb")  # noqa: SIM115 (returned to the caller, who closes it)
        return handle, os.fstat(handle.fileno()).st_size
    fs, inner = filesystem(path)
    size = fs.size(inner)
    options = {"block_size": 0} if sequential and path.split("://", 1)[0].lower() in ("http", "https") else {}
    return fs.open(inner, "rb", **options), int(size if size is not None else -1)
