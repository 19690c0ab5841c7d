"""Bencode, the encoding of rtpengine's control protocol (ng): dictionaries, lists, byte
strings and integers. Bounded: nesting depth and length are checked while decoding."""

__all__ = ["BencodeError", "decode", "encode"]

MAX_DEPTH = 32


class BencodeError(ValueError):
    pass


def encode(value):
    if isinstance(value, bool):
        raise BencodeError("bencode has no booleans")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, (list, tuple)):
        return b"l" + b"".join(encode(item) for item in value) + b"e"
    if isinstance(value, dict):
        items = sorted((key.encode() if isinstance(key, str) else key, item) for key, item in value.items())
        return b"d" + b"".join(encode(key) + encode(item) for key, item in items) + b"e"
    raise BencodeError(f"cannot bencode {type(value).__name__}")


def decode(data):
    """The value of data (bytes), keys and strings as str where they are UTF-8."""
    value, end = _decode(data, 0, 0)
    if end != len(data):
        raise BencodeError("trailing bytes")
    return value


def _decode(data, index, depth):
    if depth > MAX_DEPTH:
        raise BencodeError("nested too deeply")
    if index >= len(data):
        raise BencodeError("truncated")
    lead = data[index : index + 1]
    if lead == b"i":
        try:
            end = data.index(b"e", index)
            return int(data[index + 1 : end]), end + 1
        except ValueError:
            raise BencodeError("a malformed integer") from None
    if lead in (b"l", b"d"):
        index += 1
        items = []
        while data[index : index + 1] != b"e":
            item, index = _decode(data, index, depth + 1)
            items.append(item)
            if index >= len(data):
                raise BencodeError("truncated")
        if lead == b"l":
            return items, index + 1
        if len(items) % 2:
            raise BencodeError("a dictionary with a key and no value")
        return dict(zip(items[::2], items[1::2], strict=True)), index + 1
    if lead.isdigit():
        try:
            colon = data.index(b":", index)
            length = int(data[index:colon])
        except ValueError:
            raise BencodeError("a malformed string length") from None
        start, end = colon + 1, colon + 1 + length
        if end > len(data):
            raise BencodeError("truncated")
        raw = data[start:end]
        try:
            return raw.decode(), end
        except UnicodeDecodeError:
            return raw, end
    raise BencodeError(f"unexpected byte {lead!r}")
