"""Upload fixtures shared by the serve tests (imported by name: pytest puts this folder on sys.path)."""

import struct
import zlib
from pathlib import Path


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming ``width x height`` with a tiny payload: a pixel bomb that costs nothing to make."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path
