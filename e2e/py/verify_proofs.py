"""A third party's check of custody's Merkle proofs, with pyarrow and no custody code.

Usage: verify_proofs.py FLIGHT_URL

Pulls every entry over Flight, recomputes the RFC 6962 root from the entries' canonical
bytes, compares it with the ledger's status, then asks for inclusion proofs of a spread of
entries and consistency proofs between a spread of sizes and checks each with the
algorithms of RFC 9162 section 2.1.3.2 and 2.1.4.2. Exits non-zero on any mismatch.
"""
import base64
import hashlib
import json
import sys

import pyarrow.flight as fl


def leaf(b):
    # A pruned entry ("CPR1", README: "The ledger's canonical entry") keeps its leaf at
    # bytes 4+8+8+32+32 .. +32.
    if b[:4] == b"CPR1":
        return b[84:116]
    return hashlib.sha256(b"\x00" + b).digest()


def node(l, r):
    return hashlib.sha256(b"\x01" + l + r).digest()


def mth(leaves):
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node(mth(leaves[:k]), mth(leaves[k:]))


def verify_inclusion(index, size, h, proof, root):
    if index >= size:
        return False
    fn, sn, r = index, size - 1, h
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first, second, first_root, second_root, proof):
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof
    if first & (first - 1) == 0:
        proof = [first_root] + proof
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


def action(c, name, body):
    r = next(iter(c.do_action(fl.Action(name, json.dumps(body).encode()))))
    return json.loads(r.body.to_pybytes())


def main():
    c = fl.FlightClient(sys.argv[1])
    status = action(c, "status", {})
    size = status["size"]
    t = c.do_get(fl.Ticket(json.dumps({"table": "entries"}).encode())).read_all()
    entries = [bytes(e) for e in t.column("entry").to_pylist()][:size]
    assert len(entries) == size, f"pulled {len(entries)} entries, status says {size}"
    leaves = [leaf(e) for e in entries]
    root = mth(leaves)
    assert base64.b64decode(status["tree_root"]) == root, "the ledger's root is not the root of its entries"
    checked = 0
    for i in sorted({0, 1, size // 3, size // 2, size - 2, size - 1} & set(range(size))):
        for n in sorted({i + 1, size}):
            p = action(c, "inclusion_proof", {"index": i, "size": n})
            assert base64.b64decode(p["entry"]) == entries[i], f"entry {i} differs from the one pulled"
            proof = [base64.b64decode(h) for h in p["proof"]]
            assert verify_inclusion(i, n, leaves[i], proof, mth(leaves[:n])), f"inclusion {i} in {n} fails"
            checked += 1
    for m in sorted({1, 2, 3, size // 2, size - 1} & set(range(1, size + 1))):
        p = action(c, "consistency_proof", {"first": m, "second": size})
        proof = [base64.b64decode(h) for h in p["proof"]]
        assert verify_consistency(m, size, mth(leaves[:m]), root, proof), f"consistency {m} -> {size} fails"
        checked += 1
    print(json.dumps({"size": size, "root": base64.b64encode(root).decode(), "proofs_checked": checked}))


if __name__ == "__main__":
    main()
