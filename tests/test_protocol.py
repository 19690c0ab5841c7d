"""Frame decoding, message validation and de-duplication, without sockets."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thor.events import protocol
from thor.events.client import Deduplicator
from thor.events.protocol import ProtocolError
from thor.transport.framing import FrameDecoder, FrameError, encode_frame

MAX = 1024


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=2 * MAX), max_size=20))
def test_decoder_on_arbitrary_bytes_fails_only_with_frame_error_and_stays_bounded(chunks):
    decoder = FrameDecoder(MAX)
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except FrameError:
            return  # the connection ends; nothing else may escape
        assert all(len(frame) <= MAX for frame in frames)
        # Never more than one incomplete frame (header + payload) is held back.
        assert decoder.buffered < 4 + MAX


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=MAX), max_size=20), st.lists(st.integers(1, 64), min_size=1, max_size=50))
def test_frames_survive_any_split(payloads, cuts):
    stream = b"".join(encode_frame(payload, MAX) for payload in payloads)
    decoder, decoded, position, index = FrameDecoder(MAX), [], 0, 0
    while position < len(stream):
        size = cuts[index % len(cuts)]
        decoded.extend(decoder.feed(stream[position : position + size]))
        position += size
        index += 1
    assert decoded == payloads
    assert decoder.buffered == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_message_decoding_of_arbitrary_payloads_fails_only_with_protocol_error(payload):
    try:
        message = protocol.decode(payload)
    except ProtocolError as error:
        assert error.code in (protocol.MALFORMED, protocol.INVALID)
    else:
        assert message["type"] in protocol.CHECKS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


# A publish frame's fields, each as (valid values, invalid values); None: the field may be absent.
PUBLISH_FIELDS = {
    "topic": (st.sampled_from(["App.T", "Thor.Presence", "a.b-c_d"]), st.sampled_from(["", "bad topic", 7, None])),
    "session": (
        st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
        st.sampled_from(["", "a b", "x" * 65, 3, None]),
    ),
    "seq": (st.integers(1, 2**53), st.one_of(st.integers(max_value=0), st.booleans(), st.just(1.5), st.just("1"))),
    "body": (json_values, st.nothing()),
    "retain": (st.sampled_from([True, False, "append"]), st.sampled_from(["yes", 1, 0, 1.0, None, []])),
    "deliver": (st.booleans(), st.sampled_from([1, 0, "true", None])),
}
OPTIONAL = {"retain", "deliver"}


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_a_publish_frame_is_accepted_exactly_when_each_field_is_valid(data):
    """Each field valid, invalid or absent: decode must accept the frame exactly when every field is
    valid and every required one present, and refuse it as invalid otherwise."""
    message, expected = {"type": "publish"}, True
    for field, (valid, invalid) in PUBLISH_FIELDS.items():
        kinds = ["valid", "absent"] + (["invalid"] if not invalid.is_empty else [])
        kind = data.draw(st.sampled_from(kinds), label=field)
        if kind == "absent":
            expected = expected and field in OPTIONAL
        else:
            message[field] = data.draw(valid if kind == "valid" else invalid, label=field)
            expected = expected and kind == "valid"
    if expected:
        assert protocol.decode(protocol.encode(message)[4:]) == message
    else:
        with pytest.raises(ProtocolError) as raised:
            protocol.decode(protocol.encode(message)[4:])
        assert raised.value.code == protocol.INVALID


def test_deeply_nested_json_is_malformed_not_a_crash():
    with pytest.raises(ProtocolError) as raised:
        protocol.decode(b"[" * 100000 + b"]" * 100000)
    assert raised.value.code == protocol.MALFORMED


def test_oversized_header_is_refused_before_the_payload_arrives():
    decoder = FrameDecoder(MAX)
    with pytest.raises(FrameError, match="frame of 1025 bytes announced, the maximum is 1024"):
        decoder.feed(struct.pack("!I", MAX + 1))


@pytest.mark.parametrize(
    "message",
    [
        {"type": "publish", "topic": "bad topic", "session": "s", "seq": 1, "body": 1},
        {"type": "publish", "topic": "A", "session": "", "seq": 1, "body": 1},
        {"type": "publish", "topic": "A", "session": "s", "seq": 0, "body": 1},
        {"type": "publish", "topic": "A", "session": "s", "seq": 1},
        {"type": "publish", "topic": "A", "session": "s", "seq": 1, "body": 1, "retain": "yes"},
        {"type": "subscribe", "topics": []},
        {"type": "subscribe", "topics": ["A"] * 65},
        {"type": "subscribe", "topics": [1]},
        {"type": "hello"},
        {"type": "hello", "version": "1"},
    ],
)
def test_invalid_messages(message):
    with pytest.raises(ProtocolError) as raised:
        protocol.decode(protocol.encode(message)[4:])
    assert raised.value.code == protocol.INVALID


def test_deduplicator_delivers_each_sequence_once_in_first_arrival_order():
    dedup = Deduplicator()
    arrivals = [1, 1, 2, 3, 2, 3, 1, 4, 4]  # the same stream through three servers
    delivered = [seq for seq in arrivals if dedup.first_time("node1", "s1", "T", seq)]
    assert delivered == [1, 2, 3, 4]
    # Streams are separate per publisher, session and topic.
    assert dedup.first_time("node1", "s2", "T", 1)
    assert dedup.first_time("node2", "s1", "T", 1)
    assert dedup.first_time("node1", "s1", "U", 1)


def test_deduplicator_fills_gaps_and_stays_bounded():
    dedup = Deduplicator(max_streams=10, max_pending=8)
    assert dedup.first_time("p", "s", "T", 10)  # the first message sets the watermark
    assert not dedup.first_time("p", "s", "T", 9)  # older than anything seen: a retained copy
    assert dedup.first_time("p", "s", "T", 12)  # 11 is missing on this path
    assert dedup.first_time("p", "s", "T", 11)  # another server delivers it: still once
    assert not dedup.first_time("p", "s", "T", 11)
    for seq in range(20, 40):  # a gap (13..19) nobody fills is given up after max_pending
        dedup.first_time("p", "s", "T", seq)
    stream = dedup._streams[("p", "s", "T")]
    assert len(stream[1]) <= 8
    for index in range(100):
        dedup.first_time("p", f"session{index}", "T", 1)
    assert len(dedup._streams) == 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.permutations(list(range(1, 30))), min_size=1, max_size=3))
def test_deduplicator_property_each_number_once_from_the_first_that_arrives(paths):
    dedup = Deduplicator()
    delivered = []
    for path in paths:
        delivered.extend(seq for seq in path if dedup.first_time("p", "s", "T", seq))
    assert len(delivered) == len(set(delivered))  # at most once
    # At least once: every number from the first that arrived on (those below count as retained
    # copies of what came before this member joined), through whichever path brought it.
    assert set(delivered) == set(range(paths[0][0], 30))
