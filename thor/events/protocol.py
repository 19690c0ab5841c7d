"""The event bus wire protocol (docs/protocol.md).

Every frame (thor.transport.framing) carries one JSON object with a "type".
This module encodes and validates them; it knows nothing of sockets.
"""

import json
import re

from thor.transport.framing import DEFAULT_MAX_FRAME_SIZE, encode_frame

__all__ = [
    "APPEND",
    "MAX_TOPICS_PER_FRAME",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
# What a member accepts from an event server it authenticated (a snapshot of
# every connected member can outgrow what members may send).
MAX_SERVER_FRAME_SIZE = 16 << 20
MAX_TOPICS_PER_FRAME = 64
# A publication's retain: false (not kept), true (kept, replacing what the publisher's
# connection kept on the topic) or "append" (added to it: a retained log, on log topics).
APPEND = "append"
RETAIN_VALUES = (False, True, APPEND)
_TOPIC = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_SESSION = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")

# Error codes; the first group ends the connection.
MALFORMED = "malformed"
OVERSIZED = "oversized"
UNSUPPORTED_VERSION = "unsupported-version"
UNEXPECTED = "unexpected"
INVALID = "invalid"
SLOW_CONSUMER = "slow-consumer"
IDLE = "idle"
FORBIDDEN = "forbidden"
LIMIT = "limit"
FATAL_ERRORS = frozenset({MALFORMED, OVERSIZED, UNSUPPORTED_VERSION, UNEXPECTED, INVALID, SLOW_CONSUMER, IDLE})


class ProtocolError(Exception):
    def __init__(self, code, message, **details):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    @property
    def fatal(self):
        return self.code in FATAL_ERRORS

    def frame(self):
        return encode({"type": "error", "code": self.code, "message": self.message, **self.details})


def encode(message, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    return encode_frame(payload, max_frame_size)


def is_topic(value):
    return isinstance(value, str) and _TOPIC.match(value) is not None


def _require(message, key, kind, optional=False):
    if key not in message:
        if optional:
            return None
        raise ProtocolError(INVALID, f"{message['type']} frame lacks {key!r}")
    value = message[key]
    # bool is an int in Python; a count or sequence number must not be True.
    if not isinstance(value, kind) or (kind in (int, (int, float)) and isinstance(value, bool)):
        raise ProtocolError(INVALID, f"{message['type']} frame: {key!r} has the wrong type")
    return value


def _check_topics(message):
    topics = _require(message, "topics", list)
    if not topics or len(topics) > MAX_TOPICS_PER_FRAME:
        raise ProtocolError(INVALID, f"{message['type']} takes 1 to {MAX_TOPICS_PER_FRAME} topics")
    for topic in topics:
        if not is_topic(topic):
            raise ProtocolError(INVALID, f"invalid topic {str(topic)[:40]!r}")


def _check_topic(message):
    if not is_topic(_require(message, "topic", str)):
        raise ProtocolError(INVALID, f"invalid topic {message['topic'][:40]!r}")


def _check_publish(message):
    _check_topic(message)
    if not _SESSION.match(_require(message, "session", str)):
        raise ProtocolError(INVALID, "publish: session must be 1 to 64 letters, digits, '_' or '-'")
    if _require(message, "seq", int) < 1:
        raise ProtocolError(INVALID, "publish: seq must be a positive integer")
    retain = message.get("retain", False)
    # Compared by identity too: 1 and 0.0 equal True and False, but are no retain value.
    if not any(retain is value or (isinstance(retain, str) and retain == value) for value in RETAIN_VALUES):
        raise ProtocolError(INVALID, 'publish: retain must be true, false or "append"')
    _require(message, "deliver", bool, optional=True)
    if "body" not in message:
        raise ProtocolError(INVALID, "publish frame lacks 'body'")


def _check_message(message):
    _check_publish(message)
    _require(message, "publisher", str)


def _check_hello(message):
    _require(message, "version", int)
    _require(message, "keepalive", (int, float), optional=True)


def _check_error(message):
    _require(message, "code", str)
    _require(message, "message", str)


def _no_fields(message):
    pass


CHECKS = {
    "hello": _check_hello,
    "subscribe": _check_topics,
    "unsubscribe": _check_topics,
    "publish": _check_publish,
    "message": _check_message,
    "ping": _no_fields,
    "pong": _no_fields,
    "error": _check_error,
}


def decode(payload):
    """Parse and validate one frame's payload; raise ProtocolError when it is not a valid message."""
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(MALFORMED, "frame is not a JSON document") from None
    except RecursionError:
        raise ProtocolError(MALFORMED, "frame nests too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError(MALFORMED, "frame is not a JSON object")
    kind = message.get("type")
    check = CHECKS.get(kind) if isinstance(kind, str) else None
    if check is None:
        raise ProtocolError(INVALID, f"unknown frame type {str(kind)[:40]!r}")
    check(message)
    return message
