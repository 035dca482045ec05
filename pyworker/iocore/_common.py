"""Shared constants and argument checks of the I/O core twins (no I/O here)."""

from __future__ import annotations

import struct

FRAME_HEADER = struct.Struct("<IBBH")
"""Frame header on executor pipes: (payload length, kind, channel, 0)."""

COMPRESSIONS: dict[str | None, int] = {None: 0, "gz": 1, "bz2": 2}


def check_tar_args(compress: str | None, level: int) -> None:
    """Raise ValueError for an unknown compression or a level it does not accept."""
    if compress not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compress!r} (expected None, 'gz' or 'bz2')")
    if compress == "gz" and not -1 <= level <= 9:
        raise ValueError(f"gzip level must be in -1..9, not {level}")
    if compress == "bz2" and not 1 <= level <= 9:
        raise ValueError(f"bzip2 level must be in 1..9, not {level}")


def check_frame_args(kind: int, channel: int, count: int, frame_max: int) -> None:
    """Raise ValueError for frame fields that do not fit the header."""
    if not 0 <= kind <= 255 or not 0 <= channel <= 255:
        raise ValueError("kind and channel must be in 0..255")
    if count < 0:
        raise ValueError("count must be >= 0")
    if not 1 <= frame_max <= 0xFFFFFFFF:
        raise ValueError("frame_max must be in 1..2**32-1")
