"""Fuzzing the lean MQTT reader's parser (agent.fleet.mqttin) with random and mutated packets.

The bytes come from the network, so whatever they are the parser must return (never raise),
report trouble only as its own MalformedPacket, keep its invariants (the packets it returns are
exactly those of the bytes it says it used; what it leaves is one incomplete packet) and finish
in bounded time; the reader's session fed the same bytes ends only with its own errors. Seeded
(reproducible), ~4,000 inputs per protocol version, a few seconds in all.
"""

from __future__ import annotations

import random
import time

import pytest

from agent.fleet import mqttin
from agent.fleet.mqttin import (
    Control,
    MalformedPacket,
    Publish,
    connack_result,
    packet_end,
    parse_packets,
    suback_codes,
)
from tests.test_fleet_hostile import _TrickleSocket
from tests.test_fleet_mqttin import _stream, publish

SEED = 2112
ROUNDS = 2000
MAX_CALL_S = 0.5  # one parse of at most a few KB: far below this unless it loops


def random_packets(rng: random.Random) -> bytes:
    """Bytes that look like MQTT only by chance: a packet type, a length, noise."""
    out = bytearray()
    for _ in range(rng.randint(1, 4)):
        out.append(rng.choice([0x20, 0x30, 0x31, 0x32, 0x33, 0x34, 0x90, 0xD0, 0xE0,
                               rng.randrange(256)]))
        n = rng.choice([0, 1, 2, 5, 40, 127, 128, 300, rng.randrange(70_000)])
        length = bytearray()
        while True:
            b, n = n & 127, n >> 7
            length.append(b | (128 if n else 0))
            if not n:
                break
        if rng.random() < 0.1:
            length = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        out += length + bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    return bytes(out)


def mutated(rng: random.Random, good: bytes) -> bytes:
    """A valid stream with a few flipped, inserted, deleted or repeated bytes, or cut short."""
    b = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] = rng.randrange(256)
        elif op == 1:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
        elif op == 2:
            del b[i:i + rng.randint(1, 50)]
        elif op == 3:
            b[i:i] = b[i:i + rng.randint(1, 30)]
        else:
            del b[rng.randrange(len(b) + 1):]
    return bytes(b)


def inputs(v5: bool) -> list[bytes]:
    rng = random.Random(SEED + v5)
    good, _ = _stream(v5)
    small = publish("eva/d/stats", b"{}", v5=v5) + b"\x90\x03\x00\x01\x01" + b"\xd0\x00"
    out = [random_packets(rng) for _ in range(ROUNDS)]
    out += [mutated(rng, rng.choice([good[:3000], small, good[-400:]])) for _ in range(ROUNDS)]
    return out


def check_parse(buf: bytes, v5: bool) -> None:
    t = time.perf_counter()
    packets, used, err = parse_packets(buf, v5)  # anything else raised fails the test
    assert time.perf_counter() - t < MAX_CALL_S
    assert 0 <= used <= len(buf)
    assert err is None or type(err) is MalformedPacket
    for p in packets:
        assert type(p) in (Publish, Control)
        if type(p) is Publish:
            assert isinstance(p.topic, str) and p.topic and len(p.packet_id) in (0, 2)
    # the packets are exactly those of the bytes used: parsing only those gives them again
    assert parse_packets(buf[:used], v5) == (packets, used, None)
    if err is None and used < len(buf):  # what is left waits for more bytes, and not for a
        end = packet_end(buf, used)       # packet larger than the broker may send
        assert end > len(buf) and (end == len(buf) + 1 or end - used <= mqttin.MAX_PACKET)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5"])
def test_random_and_mutated_packets_give_only_malformed_packet_and_keep_the_invariants(
        v5: bool) -> None:
    bufs = inputs(v5)
    t = time.perf_counter()
    errors = 0
    for buf in bufs:
        check_parse(buf, v5)
        errors += parse_packets(buf, v5)[2] is not None
    assert errors > len(bufs) // 4  # the inputs do reach the parser's refusals
    assert time.perf_counter() - t < 60


@pytest.mark.timeout(60)
def test_the_body_readers_raise_only_malformed_packet() -> None:
    rng = random.Random(SEED)
    for _ in range(3000):
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
        v5 = rng.random() < 0.5
        for read in (connack_result, suback_codes):
            try:
                read(body, v5)
            except MalformedPacket:
                pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5"])
def test_the_session_fed_random_bytes_ends_only_with_its_own_errors(v5: bool) -> None:
    """What reaches the model is what the parser returned, and the connection ends with a lost
    connection, a refusal or a malformed packet: never another exception, never a hang."""
    rng = random.Random(SEED * 3 + v5)
    ends: set[str] = set()
    for buf in inputs(v5)[::4]:
        got: list[tuple[str, bytes, bool]] = []
        sub = mqttin.Subscriber(lambda t, p, r, got=got: got.append((t, p, r)),
                                host="127.0.0.1", port=1, tls=False, topic_filter="eva/+/stats",
                                client_id="fuzz", version="5" if v5 else "3.1.1")
        try:
            sub._session(_TrickleSocket(buf, rng.randint(1, 4096)))  # type: ignore[arg-type]
        except (mqttin._Lost, mqttin._Refused, MalformedPacket) as e:
            ends.add(type(e).__name__)
        packets, _, _ = parse_packets(buf, v5)
        handed = [(p.topic, p.payload, p.retained) for p in packets if type(p) is Publish]
        assert got == handed[:len(got)]
        assert sub.messages == len(got)
    assert {"_Lost", "MalformedPacket"} <= ends
