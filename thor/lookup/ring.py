"""The one-hop lookup: a consistent-hash ring per role, with virtual points.

Positions live on the integer circle [0, 2**64). A position is the first 8
bytes, read big-endian, of the MD5 digest of some UTF-8 text:

- a node (identified by its IP address, e.g. "10.0.0.5") owns the positions
  of "10.0.0.5#0", "10.0.0.5#1", ... "10.0.0.5#<points - 1>";
- a key (a subscriber address normalized by normalize_key, "alice@example.com")
  sits at the position of its text;
- the key's responsible node owns the first point at or after the key's
  position, going around the circle (past the last point: the first one).
  Equal positions (never seen in practice) are ordered by the node's address.

Every process on every machine computes the same owner from the same member
addresses and point count; MD5 is used for its spread and its availability
everywhere, not for security.
"""

import bisect
import functools
import re
import unicodedata
from array import array

try:  # CPython's built-in MD5 is faster than OpenSSL's for short texts; the digest is the same.
    from _md5 import md5
except ImportError:  # pragma: no cover
    from hashlib import md5

__all__ = [
    "DEFAULT_POINTS",
    "MAX_KEY_LENGTH",
    "URI_SCHEMES",
    "HashRing",
    "InvalidKeyError",
    "key_position",
    "normalize_key",
]

# Measured (docs/benchmarks.md): with the original's 1000 points, 8% of random
# 3-node networks give one node more than 1.05 x its fair share; with 4000 none
# of 200 did. 4000 points per node cost 32 KiB of ring per node.
DEFAULT_POINTS = 4000

MAX_KEY_LENGTH = 256
# The URI schemes of a subscriber's address of record: SIP, and presence and IM (RFC 3859, 3860).
URI_SCHEMES = ("sip", "sips", "pres", "im")

_BUCKET_BITS = 16
_BUCKET_SHIFT = 64 - _BUCKET_BITS
# One @ between two runs without controls, blanks or the characters a URI form brings.
_plain_key = re.compile(r"[^\x00-\x20\x7f@:;?<>]+@[^\x00-\x20\x7f@:;?<>]+").fullmatch
_AMBIGUOUS = 0xFFFF
_from_bytes = int.from_bytes


class InvalidKeyError(ValueError):
    """A text that is not a subscriber address; str() says why."""


def normalize_key(text):
    """The ring key of a subscriber address: "user@domain", lowercase.

    "Alice@Example.COM", "sip:alice@example.com", '"Alice" <sips:alice@example.com:5061;transport=tls>;tag=1'
    all give "alice@example.com". Rules (docs/lookup-protocol.md): surrounding blanks go; of a
    name-addr only the URI between < and > counts; a sip:, sips:, pres: or im: scheme goes (any
    other scheme is refused); URI parameters (;...) and headers (?...) go; after a scheme, a
    password (user:password@) goes; a port after the domain goes; everything is lowercased (the user part
    too: two subscribers differing only in case share a node, which is harmless, while one
    subscriber spread over two nodes would not be) and non-ASCII text is put in Unicode NFC.
    What remains must be user@domain, printable, without blanks, at most MAX_KEY_LENGTH characters.
    """
    # The hot path of every lookup: a plain ASCII "user@domain" takes one match.
    if len(text) <= MAX_KEY_LENGTH and text.isascii() and _plain_key(text):
        return text.lower()
    key = text.strip().lower()
    if not key.isascii():  # one spelling of "café" for the ring, whichever the client sent
        key = unicodedata.normalize("NFC", key)
    if ":" in key or ";" in key or "?" in key or "<" in key or '"' in key:
        key = _strip_uri(text, key)
    at = key.find("@")
    # isprintable() is False for tabs and line breaks, True for spaces.
    if (
        0 < at < len(key) - 1
        and len(key) <= MAX_KEY_LENGTH
        and key.find("@", at + 1) < 0
        and " " not in key
        and "<" not in key
        and ">" not in key
        and key.isprintable()
    ):
        return key
    return _refuse(text, key)


def _refuse(text, key):
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"subscriber address longer than {MAX_KEY_LENGTH} characters")
    user, _, domain = key.partition("@")
    if not user or not domain:
        raise InvalidKeyError(f"{_shown(text)} is not a subscriber address: expected user@domain")
    raise InvalidKeyError(f"{_shown(text)} is not a subscriber address: expected one @, no blanks and no < >")


def _strip_uri(text, key):
    if key.startswith('"'):  # a quoted display name may hold anything, < included
        end = key.find('"', 1)
        while end > 0 and key[end - 1] == "\\":
            end = key.find('"', end + 1)
        if end < 0:
            raise InvalidKeyError(
                f"{_shown(text)} is not a subscriber address: a display name without its closing quote"
            )
        key = key[end + 1 :].lstrip()
    start = key.find("<")
    if start >= 0:  # a name-addr: the display name before and the header parameters after go
        end = key.find(">", start)
        if end < 0:
            raise InvalidKeyError(f"{_shown(text)} is not a subscriber address: a < without its >")
        key = key[start + 1 : end].strip()
    scheme, colon, rest = key.partition(":")
    schemed = bool(colon) and "@" not in scheme  # a colon after the @ is a port's
    if schemed:
        if scheme not in URI_SCHEMES:
            raise InvalidKeyError(
                f"{_shown(text)} is not a subscriber address: expected user@domain or a "
                f"{', '.join(name + ':' for name in URI_SCHEMES)} URI"
            )
        key = rest
    key = key.partition(";")[0].partition("?")[0]
    user, at, host = key.rpartition("@")
    if at:
        if host.startswith("["):  # an IPv6 reference keeps its colons
            end = host.find("]")
            host = host[: end + 1] if end > 0 else host
        else:
            host = host.partition(":")[0]
        key = f"{user.partition(':')[0]}@{host}"  # a password in the user part goes too
    return key


def _shown(text):
    return repr(text if len(text) <= 60 else text[:57] + "...")


def key_position(key):
    """The position of a normalized key on the circle."""
    return _from_bytes(md5(key.encode()).digest()[:8], "big")


@functools.lru_cache(maxsize=1024)
def _node_points(address, points):
    # A node's points never change; a ring rebuilt after a status change reuses them (8 bytes a point).
    prefix = address.encode() + b"#"
    return array("Q", [_from_bytes(md5(prefix + str(index).encode()).digest()[:8], "big") for index in range(points)])


class HashRing:
    """An immutable ring over node addresses; owner(key) is the responsible node."""

    __slots__ = ("_owners", "_positions", "nodes", "owner", "points")

    def __init__(self, addresses, points=DEFAULT_POINTS):
        if points < 1:
            raise ValueError("points: expected at least 1")
        self.nodes = tuple(sorted(set(addresses)))
        self.points = points
        if len(self.nodes) >= _AMBIGUOUS:
            raise ValueError(f"a ring holds at most {_AMBIGUOUS - 1} nodes")
        # Sort plain integers (position << 16 | node index): several times faster than tuples.
        merged = []
        for index, address in enumerate(self.nodes):
            merged.extend((position << 16) | index for position in _node_points(address, points))
        merged.sort()
        self._positions = array("Q", [value >> 16 for value in merged])
        self._owners = [self.nodes[value & 0xFFFF] for value in merged]
        self.owner = _owner_function(self._positions, self._owners)

    def __len__(self):
        return len(self.nodes)

    def __repr__(self):
        return f"HashRing({len(self.nodes)} nodes x {self.points} points)"

    def shares(self):
        """address -> the fraction of the circle it owns (sums to 1)."""
        shares = dict.fromkeys(self.nodes, 0)
        previous = self._positions[-1] - (1 << 64) if self._owners else 0
        for position, owner in zip(self._positions, self._owners, strict=True):
            shares[owner] += position - previous
            previous = position
        return {address: arc / (1 << 64) for address, arc in shares.items()}


def _owner_function(positions, owners):
    """owner(key): the address responsible for a normalized key, None on an empty ring.

    A closure over local names, because it runs once per lookup. Two tables
    spare it most of the binary search and its cache misses:

    - slots: the circle cut into 4 to 8 slots per point; a slot without a
      point has one owner (that of the next point), stored as its node
      index; a slot with a point holds AMBIGUOUS;
    - buckets: the circle cut into 65536; buckets[b] is the index of the
      first point at or after b << 48, so the search in an AMBIGUOUS slot
      only covers a handful of points.
    """
    size = len(positions)
    if not size:
        return lambda key: None
    nodes = sorted(set(owners))
    index_of = {address: index for index, address in enumerate(nodes)}
    slot_bits = max(8, size.bit_length() + 2)
    slot_shift = 64 - slot_bits
    slots = array("H", [_AMBIGUOUS]) * (1 << slot_bits)
    previous = -1
    for position, address in zip(positions, owners, strict=True):
        slot = position >> slot_shift
        if slot > previous + 1:  # the slots strictly between two points' slots belong to the later point
            slots[previous + 1 : slot] = array("H", [index_of[address]]) * (slot - previous - 1)
        previous = slot
    if previous + 1 < len(slots):  # past the last point: the first point's node, around the circle
        slots[previous + 1 :] = array("H", [index_of[owners[0]]]) * (len(slots) - previous - 1)
    buckets = array("I", [0]) * ((1 << _BUCKET_BITS) + 1)
    start = 0
    for bucket in range(1 << _BUCKET_BITS):
        start = bisect.bisect_left(positions, bucket << _BUCKET_SHIFT, start)
        buckets[bucket] = start
    buckets[1 << _BUCKET_BITS] = size
    first = owners[0]
    search = bisect.bisect_left

    def owner(key):
        position = _from_bytes(md5(key.encode()).digest()[:8], "big")
        node = slots[position >> slot_shift]
        if node != _AMBIGUOUS:
            return nodes[node]
        bucket = position >> _BUCKET_SHIFT
        index = search(positions, position, buckets[bucket], buckets[bucket + 1])
        return owners[index] if index < size else first

    return owner
