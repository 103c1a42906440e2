#!/usr/bin/env python3
"""List the CUDA fat binaries linked into an ELF executable (its .nv_fatbin section).

    deploy/cuda/fatbin.py BINARY [--json]

Statically linked kernel libraries (candle-kernels' libmoe.a, candle-flash-attn's
libflashattention.a) put their device code in `.nv_fatbin`: fat binaries, each a header
(magic 0xBA55ED50) followed by entries of kind 1 (PTX) or 2 (ELF = cubin, machine code for one
architecture). This prints one line per (kind, architecture): the count and the bytes, e.g.
`cubin sm_90: 160 entries, 41.3 MiB`, so a build shows what it carries without cuobjdump (not
in the toolkit wheels used here). candle's own kernels are PTX text in .rodata, not here.
Exit status 1 when the binary has no .nv_fatbin section.
"""

from __future__ import annotations

import json
import struct
import sys
from collections import Counter

FATBIN_MAGIC = 0xBA55ED50
KINDS = {1: "ptx", 2: "cubin"}


def section(data: bytes, name: bytes):
    """(offset, size) of an ELF64 little-endian section, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    str_off, = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)
    for i in range(shnum):
        base = shoff + i * shentsize
        name_off, = struct.unpack_from("<I", data, base)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off:end] == name:
            off, size = struct.unpack_from("<QQ", data, base + 0x18)
            return off, size
    return None


def entries(blob: bytes):
    """Yield (kind, sm, payload bytes) for every entry of every fat binary in blob."""
    pos = 0
    while pos + 16 <= len(blob):
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned; skip padding
            continue
        e, end = pos + hsize, pos + hsize + fsize
        while e + 32 <= end:
            kind, _ver, ehsize, padded = struct.unpack_from("<HHIQ", blob, e)
            sm, = struct.unpack_from("<I", blob, e + 28)
            if ehsize == 0:
                break
            yield KINDS.get(kind, f"kind{kind}"), sm, padded
            e += ehsize + padded
        pos = end


def human(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    data = open(sys.argv[1], "rb").read()
    sec = section(data, b".nv_fatbin")
    if sec is None:
        print("no .nv_fatbin section (no statically linked device code)")
        return 1
    off, size = sec
    count, nbytes = Counter(), Counter()
    for kind, sm, n in entries(data[off:off + size]):
        count[(kind, sm)] += 1
        nbytes[(kind, sm)] += n
    rows = [{"kind": k, "arch": f"sm_{sm}", "entries": count[(k, sm)], "bytes": nbytes[(k, sm)]}
            for (k, sm) in sorted(count)]
    if "--json" in sys.argv[2:]:
        print(json.dumps({"section_bytes": size, "entries": rows}, indent=2))
    else:
        print(f".nv_fatbin: {human(size)}")
        for r in rows:
            print(f"{r['kind']} {r['arch']}: {r['entries']} entries, {human(r['bytes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
