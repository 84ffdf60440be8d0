"""The wire format between the learner and a robot server: ZeroMQ multipart messages, a JSON header frame
followed by one frame per numpy array.

    frame 0   JSON: {"op": ..., "arrays": [[name, dtype, shape, codec], ...], ...other fields}
    frame i   the bytes of array i - 1: raw (codec "raw") or zlib-compressed (codec "zlib": uint8 arrays
              of COMPRESS_BYTES or more, i.e. camera frames)

Requests (learner -> robot) and replies (robot -> learner) share the format. Requests: ``spec``,
``reset``, ``step`` (array ``action``), ``ping``. A reply has ``ok`` (False: ``error`` says why) and the
observation arrays. Only numpy, zlib and json are needed: the robot side imports nothing else of tmrl
but this module, :mod:`app.robot.interface` and :mod:`app.robot.server` (and pyzmq).
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np

VERSION = 1  # bumped when a message changes shape; the learner refuses a server of another version
COMPRESS_BYTES = 4096  # uint8 arrays this large or larger travel zlib-compressed
ZLIB_LEVEL = 1  # fast: frames compress ~3-10x at level 1, little more at 9
DTYPES = {"float32", "float64", "int64", "int32", "uint8", "bool"}


class ProtocolError(ValueError):
    """A message that does not follow this format (named in the message)."""


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> list[bytes]:
    """The frames of a message: ``header`` (JSON-serialisable) plus ``arrays`` by name."""
    frames, layout = [], []
    for name, value in (arrays or {}).items():
        a = np.ascontiguousarray(value)
        if a.dtype.name not in DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {a.dtype}; expected one of {sorted(DTYPES)}")
        data, codec = a.tobytes(), "raw"
        if a.dtype == np.uint8 and a.nbytes >= COMPRESS_BYTES:
            data, codec = zlib.compress(data, ZLIB_LEVEL), "zlib"
        layout.append([name, a.dtype.name, list(a.shape), codec])
        frames.append(data)
    return [json.dumps({**header, "arrays": layout}).encode(), *frames]


def decode(frames: list[bytes]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a message's frames; ProtocolError naming what is wrong."""
    if not frames:
        raise ProtocolError("an empty message")
    try:
        header = json.loads(bytes(frames[0]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"the header frame is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"the header is {type(header).__name__}; expected a JSON object")
    layout = header.pop("arrays", [])
    if not isinstance(layout, list) or len(layout) != len(frames) - 1:
        raise ProtocolError(f"the header lists {layout!r} arrays but {len(frames) - 1} array frames came")
    arrays = {}
    for entry, data in zip(layout, frames[1:], strict=True):
        try:
            name, dtype, shape, codec = entry
            if dtype not in DTYPES or codec not in ("raw", "zlib"):
                raise ValueError(f"dtype {dtype!r} / codec {codec!r}")
            raw = zlib.decompress(data) if codec == "zlib" else bytes(data)
            arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        except (ValueError, TypeError, zlib.error) as err:
            raise ProtocolError(f"array entry {entry!r}: {err}") from None
    return header, arrays


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT"; ValueError naming the value otherwise."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:5555 or robot.lab:5555")
    return host, int(port)
