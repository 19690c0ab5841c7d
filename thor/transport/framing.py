"""Length-prefixed frames on a byte stream.

A frame is a 4-byte big-endian payload length followed by the payload. The
decoder never holds more than one maximal frame plus a read's worth of bytes
in memory: a header announcing more than max_frame_size is an error at once,
before any of the payload is read.
"""

import struct

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "FrameDecoder", "FrameError", "encode_frame"]

HEADER = struct.Struct("!I")
DEFAULT_MAX_FRAME_SIZE = 1 << 20


class FrameError(Exception):
    """The stream cannot be read as frames; the connection must end."""


def encode_frame(payload, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
    if len(payload) > max_frame_size:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the maximum of {max_frame_size}")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    @property
    def buffered(self):
        return len(self._buffer)

    def feed(self, data):
        """Add received bytes; return the payloads of the frames now complete."""
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        size = len(buffer)
        while size - offset >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, offset)
            if length > self.max_frame_size:
                self._buffer = bytearray()
                raise FrameError(f"frame of {length} bytes announced, the maximum is {self.max_frame_size}")
            end = offset + HEADER.size + length
            if end > size:
                break
            frames.append(bytes(buffer[offset + HEADER.size : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return frames
