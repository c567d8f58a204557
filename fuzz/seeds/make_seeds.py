#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz corpus (fuzz/corpus/<target>/seed-*).

frames: real messages from shared/spec/captures/*.json, gRPC-framed (5-byte prefix), one stream
per capture connection and direction, behind the mode byte of slim_core::fuzzing::frames.
names:  name texts and protobuf-encoded names seen in the captures.
router: scenarios in the byte format of slim_core::fuzzing::router (see the op table there).
Usage: python3 fuzz/seeds/make_seeds.py [path/to/shared/spec/captures]
"""
import glob, json, os, struct, sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")
CAPTURES = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../../shared/spec/captures")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


def frame(body):
    return b"\x00" + struct.pack(">I", len(body)) + body


# ---------------------------------------------------------------- frames + names from captures
streams = {}
texts = set()
for path in sorted(glob.glob(os.path.join(CAPTURES, "*.json"))):
    try:
        capture = json.load(open(path))
    except Exception:
        continue
    if not isinstance(capture, dict) or "messages" not in capture:
        continue
    scenario = os.path.basename(path).split(".")[0]
    for m in capture["messages"]:
        if not isinstance(m, dict) or "hex" not in m:
            continue
        body = bytes.fromhex(m["hex"])
        streams.setdefault((scenario, m.get("conn"), m.get("dir")), []).append(body)
        summary = m.get("summary", "")
        for word in summary.split():
            if word.count("/") in (2, 3):
                texts.add(word)

for i, ((scenario, conn, direction), bodies) in enumerate(sorted(streams.items(), key=str)):
    stream = b"".join(frame(b) for b in bodies[:12])
    # Alternate the mode byte: one chunk, small chunks, small chunks with a 1 KiB limit.
    mode = [0x00, 0x05, 0x85][i % 3]
    write("frames", f"{scenario}-{conn}-{direction}", bytes([mode]) + stream)
    # And the single first message, in one chunk, for a short seed.
    write("frames", f"{scenario}-{conn}-{direction}-first", bytes([0]) + frame(bodies[0]))
write("frames", "split-prefix", bytes([0x01]) + frame(b"\x32\x00") + b"\x00\x00\x00")
write("frames", "compressed", bytes([0]) + b"\x01\x00\x00\x00\x00")
write("frames", "too-large", bytes([0x80]) + b"\x00\x00\x00\x04\x01" + b"\x00" * 16)

for i, t in enumerate(sorted(texts)[:20]):
    write("names", f"capture-{i}", t.encode())
for name, t in [
    ("any", "org/ns/svc"),
    ("null", "org/ns/svc/NULL_COMPONENT"),
    ("uuid", "org/ns/svc/00000000-0000-0000-0000-00000000002a"),
    ("decimal", "agntcy/default/alice/340282366920938463463374607431768211455"),
    ("empty-component", "org//svc"),
    ("too-many", "a/b/c/d/e"),
    ("multiline", "org/ns/svc\nbad\na/b/c/12"),
]:
    write("names", name, t.encode())
# A protobuf Name: EncodedName{1,2,3,NameId{4,5}} + StringName{"a","b","c"}.
encoded = bytes([0x08, 1, 0x10, 2, 0x18, 3, 0x22, 4, 0x08, 4, 0x10, 5])
string_name = bytes([0x0a, 1]) + b"a" + bytes([0x12, 1]) + b"b" + bytes([0x1a, 1]) + b"c"
write("names", "pb-name", bytes([0x0a, len(encoded)]) + encoded + bytes([0x12, len(string_name)]) + string_name)
write("names", "pb-encoded-name", encoded)

# ---------------------------------------------------------------- router scenarios
# Ops (byte % 14): 0 accept, 1 negotiate accepted, 2 dial, 3 reply to dial, 4 close, 5 attach
# local, 6/7 (un)subscribe, 8/9 publish, 10 ack, 11 garbage/mutation, 12 replay, 13 advance time.
# Name bytes: bits 0-1 alice/bob/chan/xyz, bits 2-3 id ANY/1/2/random.
ALICE1, BOB1, ALICE_ANY, BOB_ANY, CHAN2 = 0x04, 0x05, 0x00, 0x01, 0x0A


def negotiate(idx, variant=0, key=5, breakage=0):
    """variant bits 0-1: edge/peer/remote, bit 2: our node id (self-connection), bits 3-4:
    deployment; breakage 0 = valid request, 1-8 = one rule broken."""
    return [1, idx, variant, breakage, key]


def sub(idx, sub_id, name, flags=0, more=0, extra=(), subscribe=1):
    return [6, idx, subscribe, sub_id, flags, more, name, name, *extra]


def pub(idx, src, dst, payload=b"hello", flags=0, more=0, extra=()):
    return [8, idx, flags, more, src, dst, *extra, len(payload), *payload, 0]


header = [1, 0, 0, 0, 0, 0]  # seed 1, strict config, t = 0
write("router", "edge-pair-unicast-anycast-multicast", header
      + [0] + negotiate(0) + [0] + negotiate(1, key=6)
      + sub(0, 1, ALICE1) + sub(1, 2, BOB1)
      + pub(0, ALICE1, BOB1) + pub(1, BOB1, ALICE_ANY)
      + pub(0, ALICE1, BOB_ANY, flags=0x04)  # fanout 2
      + pub(0, ALICE1, BOB1, flags=0x80)  # unsigned: dropped
      + sub(1, 2, BOB1, subscribe=0)  # unsubscribe
      + pub(0, ALICE1, BOB1)  # no route
      + [4, 1] + [13, 0x03])
write("router", "local-forwarded-subscription-acks-and-timeout", [2, 0, 0, 0, 0, 0]
      + [0] + negotiate(0) + [5]
      + sub(1, 3, ALICE1, flags=0x20, extra=[0])  # forward_to conn 0
      + [10, 0, 3, 1]  # conn 0 acks
      + sub(1, 4, BOB1, flags=0x20, extra=[0])
      + [13, 0x01, 0xff, 0xff]  # 65 s later: ack timeout
      + sub(1, 5, CHAN2, flags=0x10, extra=[0])  # recv_from conn 0
      + pub(1, ALICE1, CHAN2, flags=0x04)
      + pub(1, ALICE1, CHAN2, flags=0x20, extra=[0])  # forward_to
      + [4, 0] + [13, 0x03])
write("router", "dial-reply-peer-and-close", [3, 0x02, 0, 0, 0, 0]
      + [2, 0] + [3, 0, 0, 9]  # dial an edge link, valid reply
      + [0] + negotiate(1, variant=1, key=7)  # accept a peer of our deployment
      + [0] + negotiate(2, variant=5, key=8)  # a self-connection: refused after the reply
      + sub(1, 1, CHAN2) + pub(0, ALICE1, CHAN2, flags=0x04)
      + [2, 1] + [3, 3, 6 | (2 << 3), 9]  # dial a peer, reply as edge
      + [4, 1] + [13, 0x03] + [13, 0x03])
write("router", "negotiation-timeout-and-garbage", [4, 0x01, 0, 0, 0, 0]
      + [0, 0, 0] + [11, 1, 0, 10, *b"0123456789"]  # garbage first: closed
      + negotiate(1, breakage=2) + [11, 2, 1, 0, 0, 0x41] + [12, 2]
      + [13, 0x03] + [13, 0x02, 0, 0, 0, 1])
# Finding F1 (BENCHMARKS.md): a local app installs a route with recv_from on a connection that
# has not negotiated; it negotiates as EDGE and closes; a publish then goes to the dead route.
# Harmless while slim_core::fuzzing::AVOID_STALE_ROUTE_BUG redirects such recv_from targets.
write("router", "f1-stale-route-after-kind-change", [5, 0, 0, 0, 0, 0]
      + [0] + [5]
      + sub(1, 1, ALICE1, flags=0x10, extra=[0])  # recv_from the pending conn 0
      + negotiate(0) + [4, 0]
      + pub(1, ALICE1, ALICE1, payload=b"\x01\x02"))
