"""Make HDF5 files written by ITK byte-identical across identical runs.

ITK's HDF5 transform writer (ANTs' ``Composite.h5``) keeps HDF5's default of
recording, in every object header, when the object was accessed, modified,
changed and created. Two runs of the same registration therefore write files that
differ in those seconds (and in the headers' checksums), although the transforms
are identical. :func:`clear_timestamps` sets the times to zero and recomputes the
checksums, in place, without an HDF5 library: the file stays valid for ITK, h5py
and ``h5dump``, and its data are untouched.

Format (HDF5 file format specification 3.0, "Version 2 Object Header"): signature
``OHDR``, version 2, flags; when flag bit 5 is set, four 32-bit times follow; when
bit 4 is set, two 16-bit attribute limits; then the size of chunk 0 in
``1 << (flags & 3)`` bytes, the chunk's messages, and a Jenkins lookup3 checksum of
everything from the signature to the end of the chunk. Version 1 object headers
(older files) keep their times in a message of their own and are left alone.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["clear_timestamps", "lookup3"]

_MASK = 0xFFFFFFFF
_TIMES_FLAG = 0x20
_ATTR_LIMITS_FLAG = 0x10


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


# lookup3's mix() and final() as (target, source, other, rotation) steps:
# mix:   target -= other; target ^= rot(other, k); other += source
# final: target ^= other; target -= rot(other, k)
_MIX = (("a", "b", "c", 4), ("b", "c", "a", 6), ("c", "a", "b", 8),
        ("a", "b", "c", 16), ("b", "c", "a", 19), ("c", "a", "b", 4))  # fmt: skip
_FINAL = (("c", "b", 14), ("a", "c", 11), ("b", "a", 25), ("c", "b", 16),
          ("a", "c", 4), ("b", "a", 14), ("c", "b", 24))  # fmt: skip


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' ``hashlittle`` (lookup3), the checksum of HDF5 metadata blocks."""
    length = len(data)
    h = dict.fromkeys("abc", (0xDEADBEEF + length + initval) & _MASK)
    if length == 0:
        return h["c"]
    # the last block (1-12 bytes) is zero-padded: adding zero bytes is what the
    # reference implementation's fall-through switch does
    padded = data + bytes(-length % 12)
    n_blocks = len(padded) // 12
    for i in range(n_blocks):
        for j, key in enumerate("abc"):
            word = int.from_bytes(padded[12 * i + 4 * j : 12 * i + 4 * j + 4], "little")
            h[key] = (h[key] + word) & _MASK
        if i == n_blocks - 1:
            break
        for target, source, other, k in _MIX:
            h[target] = ((h[target] - h[other]) & _MASK) ^ _rot(h[other], k)
            h[other] = (h[other] + h[source]) & _MASK
    for target, other, k in _FINAL:
        h[target] ^= h[other]
        h[target] = (h[target] - _rot(h[other], k)) & _MASK
    return h["c"]


def clear_timestamps(path: str | Path) -> int:
    """Zero the times of every version-2 object header of an HDF5 file, in place.

    A candidate header is changed only when its stored checksum matches the bytes
    it covers, so a chance ``OHDR`` inside raw data (a displacement field) is never
    touched.

    Parameters
    ----------
    path : str or Path
        An HDF5 file (e.g. an ANTs ``Composite.h5``).

    Returns
    -------
    int
        Number of object headers whose times were cleared.
    """
    path = Path(path)
    data = bytearray(path.read_bytes())
    if not data.startswith(b"\x89HDF\r\n\x1a\n"):
        raise ValueError(f"{path}: not an HDF5 file")
    cleared = 0
    start = data.find(b"OHDR")
    while start != -1:
        flags = data[start + 5] if start + 6 <= len(data) else 0
        if data[start + 4] == 2 and flags & _TIMES_FLAG:
            times = start + 6
            size_at = times + 16 + (4 if flags & _ATTR_LIMITS_FLAG else 0)
            size_len = 1 << (flags & 3)
            chunk = int.from_bytes(data[size_at : size_at + size_len], "little")
            end = size_at + size_len + chunk
            stored = int.from_bytes(data[end : end + 4], "little")
            if end + 4 <= len(data) and lookup3(bytes(data[start:end])) == stored:
                data[times : times + 16] = bytes(16)
                data[end : end + 4] = lookup3(bytes(data[start:end])).to_bytes(4, "little")
                cleared += 1
        start = data.find(b"OHDR", start + 4)
    if cleared:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(bytes(data))
        tmp.replace(path)
    return cleared
