#!/usr/bin/env python3
"""Extracts the identity test vectors of `identity_vectors.json` from the decoded wire captures.

Run from the repository root with the capture directory as argument:

    python3 slim-core/tests/data/extract_identity_vectors.py /work/shared/spec/captures

The captures are real slim-bindings 3.3.8 traffic (see the captures' README). The output keeps, per
message that carries an identity token, the protobuf `Message` bytes and the capture tool's own
verdicts (HeaderIntegrityAad bytes, ECDSA checks, XXH3 of the token id), so the Rust tests can
recompute everything without access to the captures.
"""
import json
import os
import sys

SECRET = "interop-shared-secret-0123456789abcdef-0123456789"

# Whole scenarios: every message with a token, both directions (the node's copies differ in ttl,
# header_mac and incoming_conn only, which must not matter to any end-to-end check).
FULL = ["a_p2p_plain.json", "b_p2p_mls.json"]
# Client-originated messages only, to keep the file small.
C2N_ONLY = ["c_group_mls.json"]
# One client-originated sample of each message type the scenarios above lack, plus every message whose
# metadata has more keys than the signature (the node reorders map entries; both copies are kept).
SAMPLES = ["flows/h1_leave_mls.json", "flows/g2_stop_epoch_rejoin_mls.json",
           "flows/f7_grp_rtx_plain.json", "flows/g3_soft_close_rejoin_mls.json"]


def header_of(decoded):
    for kind in ("publish", "subscribe", "unsubscribe"):
        if kind in decoded:
            return kind, decoded[kind].get("header", {})
    return None, None


def vector(name, m):
    kind, header = header_of(m["decoded"])
    tok = header["_identity_token"]
    v = {
        "capture": name,
        "index": m["index"],
        "dir": m["dir"],
        "kind": kind,
        "id_xxh3": tok["_xxh3_128_of_id"],
        "token_mac_ok": tok["mac_valid_hmac_sha256_secret"],
    }
    if kind == "publish":
        v["type"] = m["decoded"]["publish"]["session"]["session_message_type"].replace(
            "SESSION_MESSAGE_TYPE_", "")
    checks = m.get("_checks") or {}
    if "header_integrity_aad_hex" in checks:
        v["aad_hex"] = checks["header_integrity_aad_hex"]
    if "e2e_header_sig_valid_ecdsa_p256_sha256_over_aad" in checks:
        v["e2e_sig_ok"] = checks["e2e_header_sig_valid_ecdsa_p256_sha256_over_aad"]
    if "slim_payload_sig_valid" in checks:
        v["payload_sig_ok"] = checks["slim_payload_sig_valid"]
    v["hex"] = m["hex"]
    return v


def main(root):
    out = []
    seen_types = set()
    for name in FULL + C2N_ONLY:
        data = json.load(open(os.path.join(root, name)))
        for m in data["messages"]:
            kind, header = header_of(m["decoded"])
            if not header or not header.get("identity"):
                continue
            if name in C2N_ONLY and m["dir"] != "c2n":
                continue
            v = vector(name.removesuffix(".json"), m)
            seen_types.add(v.get("type"))
            out.append(v)
    for name in SAMPLES:
        data = json.load(open(os.path.join(root, name)))
        for m in data["messages"]:
            if not isinstance(m.get("decoded"), dict):
                continue
            kind, header = header_of(m["decoded"])
            if kind != "publish" or not header.get("identity"):
                continue
            md = m["decoded"].get("metadata", {})
            t = m["decoded"]["publish"]["session"]["session_message_type"].replace(
                "SESSION_MESSAGE_TYPE_", "")
            extra_meta = "slim-payload-sig" in md and len(md) > 1
            if extra_meta or (m["dir"] == "c2n" and t not in seen_types):
                seen_types.add(t)
                out.append(vector(name.removesuffix(".json"), m))
    doc = {
        "about": "Identity vectors from real slim-bindings 3.3.8 captures; "
                 "regenerate with extract_identity_vectors.py",
        "secret": SECRET,
        "vectors": out,
    }
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity_vectors.json"), "w") as f:
        f.write("{\n")
        f.write('"about": %s,\n' % json.dumps(doc["about"]))
        f.write('"secret": %s,\n' % json.dumps(doc["secret"]))
        f.write('"vectors": [\n')
        f.write(",\n".join(json.dumps(v, separators=(",", ":")) for v in out))
        f.write("\n]}\n")
    print(len(out), "vectors;", sorted(t for t in seen_types if t))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/spec/captures")
