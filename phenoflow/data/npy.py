"""A strict reader of .npy payloads holding uint8 images, without `ast`.

numpy parses an .npy header with `ast.literal_eval`. CPython 3.11's AST constructor keeps a recursion counter
that other threads' parses can disturb (python/cpython#106905), which surfaces as a spurious
`SystemError: AST constructor recursion depth mismatch` on an intact sample: under the skip policy a good
sample would be dropped. Image payloads need only three header fields, so they are read here with a regular
expression: magic, version (1.0, 2.0, 3.0), header length, then exactly
    {'descr': '|u1' (or '<u1', '>u1'), 'fortran_order': False | True, 'shape': (d0, d1, ...), }
and the data bytes must be exactly prod(shape). Anything else is a ValueError describing the damage.
"""
from __future__ import annotations

import math
import re
import struct

import numpy as np

MAGIC = b"\x93NUMPY"
_HEADER = re.compile(
    r"""\{\s*'descr'\s*:\s*'(?P<descr>[^']*)'\s*,\s*'fortran_order'\s*:\s*(?P<fortran>True|False)\s*,\s*"""
    r"""'shape'\s*:\s*\((?P<shape>\s*(?:\d+\s*,\s*)*\d*\s*)\)\s*,?\s*\}\s*""")


def read_uint8_npy(data: bytes | memoryview) -> np.ndarray:
    """The uint8 array in an .npy payload (a view of `data` when C-ordered); ValueError naming what is wrong."""
    data = memoryview(data)
    if len(data) < 10 or bytes(data[:6]) != MAGIC:
        raise ValueError("not an .npy payload (no \\x93NUMPY magic)")
    major = data[6]
    if major == 1:
        (hlen,), start = struct.unpack("<H", data[8:10]), 10
    elif major in (2, 3) and len(data) >= 12:
        (hlen,), start = struct.unpack("<I", data[8:12]), 12
    else:
        raise ValueError(f".npy version {major}.{data[7]} is not 1.0, 2.0 or 3.0")
    if start + hlen > len(data):
        raise ValueError(f".npy header of {hlen} bytes runs past the payload's {len(data)} bytes")
    try:
        header = bytes(data[start:start + hlen]).decode("latin1" if major < 3 else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f".npy header is not text ({e})") from None
    m = _HEADER.fullmatch(header)
    if m is None:
        raise ValueError(f".npy header {header.strip()!r} does not describe a uint8 array")
    if m["descr"] not in ("|u1", "<u1", ">u1"):
        try:
            dtype = str(np.dtype(m["descr"]))
        except TypeError:
            dtype = repr(m["descr"])
        raise ValueError(f"image has dtype {dtype}, expected uint8")
    shape = tuple(int(s) for s in m["shape"].replace(" ", "").split(",") if s)
    body = data[start + hlen:]
    if len(body) != math.prod(shape):
        raise ValueError(f".npy data has {len(body)} bytes, shape {shape} needs {math.prod(shape)}")
    arr = np.frombuffer(body, np.uint8)
    return arr.reshape(shape[::-1]).T if m["fortran"] == "True" else arr.reshape(shape)
