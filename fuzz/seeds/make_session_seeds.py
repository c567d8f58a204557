#!/usr/bin/env python3
"""Writes the hand-made seeds of the identity and session fuzz targets
(fuzz/corpus/<target>/seed-*), in the byte formats of slim_core::fuzzing::{identity,
session_payloads, session_layer, session_sim} (see the op tables in slim-core/src/fuzzing/).

Usage: python3 fuzz/seeds/make_session_seeds.py
"""
import base64, hashlib, hmac, json, os, random, struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


# ------------------------------------------------------------------ protobuf, by hand
def varint(n):
    out = b""
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(number, wire, value):
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return key + varint(len(value)) + value


def msg(*fields):
    return b"".join(fields)


def name(org, ns, svc, iid=None):
    def h(s):  # any u64 stands in for the component hash here
        return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
    enc = msg(field(1, 0, h(org)), field(2, 0, h(ns)), field(3, 0, h(svc)),
              field(4, 2, msg(field(1, 0, 0), field(2, 0, iid)) if iid is not None else b""))
    strs = msg(field(1, 2, org), field(2, 2, ns), field(3, 2, svc))
    return msg(field(1, 2, enc), field(2, 2, strs))


def participant(n):
    return msg(field(1, 2, n), field(2, 2, msg(field(1, 0, 1), field(2, 0, 1))))


def command(tag, payload):  # Content { command_payload { <tag>: payload } }
    return field(2, 2, field(tag, 2, payload))


alice, me, chan = name("org", "ns", "alice", 7), name("org", "ns", "me", 9), name("org", "ns", "chan", 11)
timers = msg(field(1, 0, 1000), field(2, 0, 10))
payloads = {
    "app": field(1, 2, msg(field(1, 2, "msg"), field(2, 2, b"hello"))),
    "discovery": command(1, b""),
    "join-p2p": command(3, field(1, 2, timers)),
    "join-group": command(3, msg(field(1, 2, timers), field(2, 2, chan), field(3, 2, chan),
                                 field(4, 2, field(1, 0, 100)))),
    "join-reply": command(4, msg(field(1, 2, b"\x01\x02"), field(2, 2, participant(alice)))),
    "update": command(7, msg(field(1, 0, 1), field(2, 2, participant(alice)),
                             field(3, 2, participant(alice)), field(3, 2, participant(me)),
                             field(4, 2, msg(field(1, 0, 3), field(2, 2, b"mls"))))),
    "welcome": command(8, msg(field(1, 2, participant(alice)), field(1, 2, participant(me)))),
    "close": command(9, msg(field(1, 2, alice), field(1, 2, me))),
    "proposal": command(10, msg(field(1, 2, alice), field(2, 2, b"prop"))),
    "heartbeat": command(13, field(1, 0, (1 << 64) - 1)),
    "state": command(14, msg(field(1, 2, alice), field(2, 0, 1), field(3, 0, 5))),
    "rejoin": command(15, msg(field(1, 2, alice), field(2, 2, b"kp"))),
    "rejoin-reply": command(16, msg(field(1, 0, 4), field(2, 2, b"commit"))),
    "mls": msg(field(1, 0, 42), field(2, 2, b"\x00\x01mls-content")),
    "aad": msg(field(1, 0, 1), field(2, 2, alice), field(3, 2, me), field(4, 2, "token"),
               field(5, 0, 1), field(6, 0, 7), field(7, 0, 1234), field(8, 0, 99),
               field(9, 2, "msg")),
    "negative-enum": msg(field(1, 0, (1 << 64) - 1), field(2, 0, 0xFFFFFFFF)),
}
for key, body in payloads.items():
    write("session_payloads", key, body)

# ------------------------------------------------------------------ identity
SECRET = b"fuzz-identity-shared-secret-0123456789abcdef"
NOW = 1_795_600_000


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(ident, ts, pubkey, secret=SECRET):
    claims = b64u(json.dumps({"pubkey": base64.b64encode(pubkey).decode()},
                             separators=(",", ":")).encode())
    message = f"{ident}:{ts}:AAAAAAAAAAAAAAAA:{claims}"
    tag = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return f"{message}:{b64u(tag)}"


def verify_text(text, now_mode=0):
    t = text.encode()
    return bytes([0]) + struct.pack("<H", len(t)) + t + bytes([now_mode])


pub = bytes([4]) + bytes(range(64))
write("identity", "valid-token", verify_text(token("org/ns/alice_fuzzAAAA", NOW, pub)))
write("identity", "expired-token", verify_text(token("org/ns/alice_fuzzAAAA", NOW - 7200, pub)))
write("identity", "other-secret", verify_text(token("a_b", NOW, pub, b"x" * 40)))
write("identity", "six-fields", verify_text("a:b:" + token("c", NOW, pub)))
# Every op once, with zero bytes for their arguments (all valid defaults), then a mix.
write("identity", "all-ops", b"".join(bytes([op]) + bytes(24) for op in range(8)))
rng = random.Random(5)
for i in range(6):
    write("identity", f"random-{i}", bytes(rng.randrange(256) for _ in range(300)))

# ------------------------------------------------------------------ session_layer
FF = 0xFF
ANSWER = [5, 0, FF, 0, FF, FF, FF, 4]          # answer the latest output, signed properly
ADVANCE = [15, 3]                              # to the next deadline


def data_msg(msg_id, body=b"abc", session_type=None):
    # structured: peer 0, latest session, message id, session type, MSG, to us, app payload
    b = 2 | (msg_id << 2)
    st = [FF] if session_type is None else [0, session_type]
    return [1, 0, 2, b] + st + [20, 3, FF, 0, len(body)] + list(body) + [0, FF, FF, 0, FF, FF, 0]


initiator = (
    [0]
    + [9, 0, 1, 0, 0, 3, 2, 0]                 # create_session(alice, reliable 100 ms x 3)
    + ANSWER + ANSWER + ANSWER                 # discovery, join, welcome answered
    + [9, 4, 2, 5] + list(b"hello") + [FF]     # publish
    + ANSWER                                   # its ack
    + data_msg(1)                              # the peer's first message
    + [9, 4, 2, 3] + list(b"bye") + [FF]       # publish, not acked
    + ADVANCE + ADVANCE + ADVANCE + ADVANCE + ADVANCE
    + [9, 7, 2]                                # close
    + ANSWER
)
write("session_layer", "p2p-initiator", initiator)

join = [1, 0, 0, 77, 0, 0, 0, 22, 0, 1, 26, 3, FF, FF, 0, 3, 3, FF, FF, FF, 0, FF, 0, FF, FF, 4]
welcome = [1, 0, 2, 22, 0, 1, 31, 3, FF, FF, 2, 3, 0, 43, 0, FF, 0, FF, 0, FF, FF, 4]
close = [1, 0, 2, 22, 0, 1, 32, 3, FF, FF, 0, 0, FF, 0, FF, FF, 4]
participant_seed = (
    [1] + join + welcome + data_msg(1, session_type=1) + data_msg(3, b"x", session_type=1)
    + ADVANCE * 4 + data_msg(2, b"late", session_type=1) + ADVANCE + close
)
write("session_layer", "p2p-participant", participant_seed)

group = (
    [2]
    + [9, 1, 1, 0, 0, 3, 2, 0]                 # create_group(org/ns/chan, reliable)
    + [9, 2, 2, 0]                             # invite alice
    + ANSWER + ANSWER + ANSWER                 # discovery, join, welcome
    + [9, 2, 2, 1]                             # invite bob
    + ANSWER + ANSWER                          # discovery, join
    + ANSWER + [5, 1, 0, FF, FF, FF, 4]        # welcome (bob), update (alice, on the channel)
    + [9, 4, 2, 3] + list(b"all") + [FF]       # publish to the group
    + [5, 0, 0, FF, FF, FF, 0] + [5, 0, 2, FF, FF, FF, 0]   # acks from alice and bob
    + [9, 3, 2, 3]                             # remove alice
    + [5, 0, 0, FF, FF, FF, 4] + [5, 0, 2, FF, FF, FF, 4]   # the update, acked by both
    + ANSWER                                   # the leave request, answered by alice
    + ADVANCE * 3
    + [9, 7, 2] + ANSWER
)
write("session_layer", "group-moderator", group)

member_join = [1, 2, 0, 88, 0, 0, 0, 22, 0, 2, 26, 3, FF, FF, 0, 3, 3, 0, 3 | (6 << 3), 0, 3 | (6 << 3),
               FF, 0, FF, 0, FF, FF, 4]
member = ([3] + member_join + [1, 2, 2, 22, 0, 2, 31, 3, FF, FF, 3, 3, 0, 43, 0, 3 | (2 << 3), 0, FF, 0, FF, 0,
                                FF, FF, 4]
          + ADVANCE * 2 + [9, 7, 2] + ANSWER + ADVANCE)
write("session_layer", "group-member", member)
rng = random.Random(7)
for i in range(4):
    write("session_layer", f"random-{i}", bytes(rng.randrange(256) for _ in range(400)))

# ------------------------------------------------------------------ session_sim
rng = random.Random(11)
for i in range(6):
    write("session_sim", f"random-{i}", bytes(rng.randrange(256) for _ in range(160)))
# Two nodes (a Remote link), two clients, lossless: a group created, joined, used, closed.
lossless = (struct.pack("<I", 1) + bytes([1, 0, 0, 0, 1]) + struct.pack("<H", 3000) + bytes([0])
            + bytes([0, 0, 5, 0] * 2) * 3 + bytes([0, 1, 0, 1, 0, 0, 0, 10, 5])
            + bytes([4]) + bytes([0, 0, 0, 0, 2] * 4))
write("session_sim", "lossless-group", lossless)
