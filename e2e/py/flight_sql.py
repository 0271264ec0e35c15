"""Compliance queries over custody's Flight SQL endpoint, with the tools auditors use:
the ADBC Flight SQL driver, pyarrow.flight speaking Flight SQL by hand, and DuckDB.

usage: flight_sql.py FLIGHT_URL EXPECT_JSON

EXPECT_JSON is what pgbench did (check_events.py's format): the resource, the caller, the
first index of the run, and per client the statements with their parameters. Prints a JSON
report; exits non-zero on the first mismatch.
"""
import json
import sys
from collections import Counter

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import pyarrow.flight as flight


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def norm(sql):
    # pgbench sends its prepared statements with the script's trailing semicolon.
    return sql.strip().rstrip(";").strip()


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, payload):
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def statement_query(sql):
    """A Flight SQL CommandStatementQuery packed in a protobuf Any, encoded by hand."""
    cmd = field(1, sql.encode())
    return field(1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery") + field(2, cmd)


def expected(expect_path):
    """EXPECT_JSON and the statements it holds, as a Counter of (SQL, params)."""
    expect = json.load(open(expect_path))
    want = Counter()
    for c in expect["statements"]:
        for s in c["steps"]:
            want[(norm(s["sql"]), tuple(s["params"]))] += 1
    return expect, want


def main():
    url, expect_path = sys.argv[1], sys.argv[2]
    expect, want = expected(expect_path)
    since, resource, subject = expect["since_index"], expect["resource"], expect["subject"]
    n_statements = sum(want.values())

    conn = flightsql.connect(url, autocommit=True)
    cur = conn.cursor()
    # Who ran what against the resource, in order, with parameters.
    cur.execute(
        f"SELECT index, session_id, subject, sql, params FROM events "
        f"WHERE resource = '{resource}' AND kind = 'request' AND message IN ('Query', 'Execute') AND index >= {since} "
        f"ORDER BY index"
    )
    ran = cur.fetch_arrow_table()
    rows = ran.to_pylist()
    got = Counter((norm(r["sql"]), tuple(r["params"] or [])) for r in rows)
    if got != want:
        missing = want - got
        extra = got - want
        fail(f"statements differ from pgbench's: missing {list(missing.items())[:3]}, unexpected {list(extra.items())[:3]}")
    if any(r["subject"] != subject for r in rows):
        fail("a statement is not attributed to the caller")
    if [r["index"] for r in rows] != sorted(r["index"] for r in rows):
        fail("ORDER BY index is not honoured")

    # Aggregates, and a time window that holds everything and one that holds nothing.
    cur.execute(f"SELECT count(*) AS n FROM events WHERE resource = '{resource}' AND index >= {since} AND commit_time >= now() - interval '1 hour'")
    recent = cur.fetchone()[0]
    cur.execute(f"SELECT count(*) AS n FROM events WHERE resource = '{resource}' AND index >= {since}")
    total = cur.fetchone()[0]
    if recent != total or total < n_statements:
        fail(f"the last hour holds {recent} of {total} events")
    cur.execute(f"SELECT count(*) FROM events WHERE resource = '{resource}' AND commit_time < now() - interval '1 hour'")
    if cur.fetchone()[0] != 0:
        fail("events older than the ledger")
    # One session's responses, as "what rows did this caller see".
    sid = rows[0]["session_id"]
    cur.execute(f"SELECT count(*) FROM events WHERE session_id = '{sid}' AND kind = 'response' AND recorded_rows IS NOT NULL")
    seen_rows = cur.fetchone()[0]
    if seen_rows == 0:
        fail(f"session {sid}: no recorded result rows")
    cur.execute(f"SELECT status, statements FROM sessions WHERE session_id = '{sid}'")
    status, statements = cur.fetchone()
    if status != "ended" or statements < 1:
        fail(f"session {sid} is {status} with {statements} statements")

    # Errors an auditor can act on.
    for bad, needle in [("SELEC 1", "SQL error"), ("SELECT * FROM no_such_table", "no_such_table"), ("SELECT no_such_column FROM events", "no_such_column"), ("DROP TABLE events", "not supported")]:
        try:
            cur.execute(bad)
            cur.fetch_arrow_table()
        except Exception as e:  # the driver raises its own error classes
            if needle.lower() not in str(e).lower():
                fail(f"{bad!r}: error does not say {needle!r}: {e}")
        else:
            fail(f"{bad!r} was accepted")
    cur.close()
    conn.close()

    # pyarrow.flight, Flight SQL by hand: the same statements.
    client = flight.FlightClient(url)
    info = client.get_flight_info(flight.FlightDescriptor.for_command(statement_query(
        f"SELECT sql FROM events WHERE resource = '{resource}' AND kind = 'request' AND message IN ('Query', 'Execute') AND index >= {since}")))
    by_hand = client.do_get(info.endpoints[0].ticket).read_all()
    if by_hand.num_rows != n_statements:
        fail(f"pyarrow.flight read {by_hand.num_rows} statements, pgbench ran {n_statements}")

    # DuckDB on the Arrow table ADBC returned.
    inserts = duckdb.sql("SELECT count(*) FROM ran WHERE sql LIKE 'INSERT INTO e2e_log%'").fetchall()[0][0]
    want_inserts = sum(v for (sql, _), v in want.items() if sql.startswith("INSERT INTO e2e_log"))
    if inserts != want_inserts:
        fail(f"DuckDB counts {inserts} inserts, pgbench ran {want_inserts}")
    print(json.dumps({"statements": n_statements, "events": total, "inserts": inserts, "session_rows_seen": seen_rows}))


if __name__ == "__main__":
    main()
