"""Reads custody's ledger with pyarrow.flight, as a compliance tool would, and checks it.

usage: check_events.py FLIGHT_URL EXPECT_JSON

EXPECT_JSON describes what must be true:
  {
    "subject": "ci-client",                  # every checked event's caller
    "resource": "pg",
    "sessions_since_index": 0,               # only events at or after this index
    "statements": [                          # per client: ordered list of statements
       {"client": 0, "steps": [{"sql_contains": "...", "params": ["1", "42"]}, ...]}
    ],
    "mode": "simple" | "extended" | "prepared"
  }

Checks: list_flights and get_schema describe the tables; every expected statement appears
exactly once, in order, in one session, with its parameters and the caller's identity; seqs
and indices increase together within a session; no (session, seq) repeats.
"""
import json
import re
import sys
from collections import defaultdict

import pyarrow.flight as flight


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def main():
    url, expect_path = sys.argv[1], sys.argv[2]
    expect = json.load(open(expect_path))
    client = flight.FlightClient(url)

    names = sorted(fi.descriptor.path[0].decode() for fi in client.list_flights())
    if names != ["entries", "events", "sessions"]:
        fail(f"list_flights gave {names}")
    schema = client.get_schema(flight.FlightDescriptor.for_path("events")).schema
    for col in ["index", "commit_time", "session_id", "seq", "kind", "subject", "sql", "params"]:
        if col not in schema.names:
            fail(f"events schema lacks {col}: {schema.names}")

    ticket = {"table": "events", "from_index": expect.get("since_index", 0), "resource": expect["resource"]}
    table = client.do_get(flight.Ticket(json.dumps(ticket).encode())).read_all()
    if table.schema.field("commit_time").type.unit != "ns":
        fail("commit_time should be a nanosecond timestamp")
    # Python datetimes stop at microseconds; keep the exact integers.
    for col in ("commit_time", "proxy_time"):
        i = table.schema.get_field_index(col)
        table = table.set_column(i, col, table.column(col).cast("int64"))
    rows = table.to_pylist()
    if not rows:
        fail("no events")

    seen = set()
    by_session = defaultdict(list)
    for r in rows:
        key = (r["session_id"], r["seq"])
        if key in seen:
            fail(f"duplicate event {key}")
        seen.add(key)
        by_session[r["session_id"]].append(r)
        if r["subject"] != expect["subject"]:
            fail(f"event {r['index']} has subject {r['subject']!r}, expected {expect['subject']!r}")
    for sid, evs in by_session.items():
        idx = [e["index"] for e in evs]
        seqs = [e["seq"] for e in evs]
        if idx != sorted(idx) or seqs != sorted(seqs):
            fail(f"session {sid}: seq and index order disagree")
        if seqs != list(range(len(seqs))):
            fail(f"session {sid}: seqs are not dense from 0: {seqs[:10]}...")
        kinds = [e["kind"] for e in evs]
        if kinds[0] != "session_start" or kinds[-1] != "session_end":
            fail(f"session {sid}: starts with {kinds[0]} and ends with {kinds[-1]}")

    # Statements: Query or Execute requests, with their parameters.
    def statements(evs):
        out = []
        for e in evs:
            if e["kind"] == "request" and e["message"] in ("Query", "Execute"):
                out.append((e["sql"] or "", e["params"] or []))
        return out

    def norm(sql):
        return sql.strip().rstrip(";").strip()

    def key(sql, params):
        return (norm(sql), tuple("NULL" if p is None else str(p) for p in params))

    remaining = dict(by_session)
    for want in expect["statements"]:
        steps = [key(s["sql"], s.get("params", [])) for s in want["steps"]]
        wanted = set(steps)
        match = None
        for sid, evs in remaining.items():
            got = [key(sql, params) for sql, params in statements(evs)]
            if [g for g in got if g in wanted] == steps:
                match = sid
                break
        if match is None:
            fail(f"client {want['client']}: no session holds exactly its {len(steps)} statements, once each, in order; first expected {steps[0]}")
        del remaining[match]

    # Every response answers an earlier request of the same session.
    for sid, evs in by_session.items():
        req_seqs = {e["seq"] for e in evs if e["kind"] == "request"}
        for e in evs:
            if e["kind"] == "response" and e["outcome"] != "notification" and e["in_reply_to"] not in req_seqs:
                fail(f"session {sid}: response seq {e['seq']} answers unknown request {e['in_reply_to']}")

    print(json.dumps({"events": len(rows), "sessions": len(by_session), "clients": len(expect["statements"])}))


if __name__ == "__main__":
    main()
