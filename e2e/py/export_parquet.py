"""A `custody export` directory read as a data lake reads it: DuckDB and pyarrow on the
Parquet files directly, no custody code.

usage:
  export_parquet.py check DIR EXPECT_JSON   compare the exported rows with what pgbench did
  export_parquet.py tamper DIR              edit one exported row's SQL in place; print its index

EXPECT_JSON is check_events.py's format (resource, caller, first index of the run, and per
client the statements with their parameters). `check` prints a JSON report and exits non-zero
on the first mismatch.
"""
import glob
import json
import os
import sys
from collections import Counter

import duckdb
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from flight_sql import expected, fail, norm


def check(root, expect_path):
    expect, want = expected(expect_path)
    since, resource, subject = expect["since_index"], expect["resource"], expect["subject"]
    files = sorted(glob.glob(os.path.join(root, "blocks", "*.parquet")))
    if not files:
        fail("no Parquet files under blocks/")

    # DuckDB straight on the files.
    pattern = os.path.join(root, "blocks", "*.parquet")
    rows = duckdb.sql(
        f"SELECT index, subject, sql, params FROM read_parquet('{pattern}') "
        f"WHERE resource = '{resource}' AND kind = 'request' AND message IN ('Query', 'Execute') AND index >= {since} ORDER BY index"
    ).fetchall()
    got = Counter((norm(sql), tuple(params or [])) for (_, _, sql, params) in rows)
    if got != want:
        fail(f"DuckDB: exported statements differ from pgbench's: missing {list((want - got).items())[:3]}, unexpected {list((got - want).items())[:3]}")
    if any(r[1] != subject for r in rows):
        fail("DuckDB: a statement is not attributed to the caller")
    n_index, lo, hi = duckdb.sql(f'SELECT count(DISTINCT "index"), min("index"), max("index") FROM read_parquet(\'{pattern}\')').fetchall()[0]
    if n_index != hi - lo + 1:
        fail(f"DuckDB: indices {lo}..{hi} are not contiguous ({n_index} distinct)")
    kinds = dict(duckdb.sql(f"SELECT kind, count(*) FROM read_parquet('{pattern}') WHERE resource = '{resource}' AND index >= {since} GROUP BY kind").fetchall())

    # pyarrow: the dataset API over the same directory, and the per-row proof column.
    dataset = ds.dataset(os.path.join(root, "blocks"), format="parquet")
    table = dataset.to_table(filter=(pc.field("resource") == resource) & (pc.field("kind") == "request") & (pc.field("index") >= since))
    execs = [m for m in table.column("message").to_pylist() if m in ("Query", "Execute")]
    if len(execs) != sum(want.values()):
        fail(f"pyarrow: {len(execs)} statements, pgbench ran {sum(want.values())}")
    proofs = table.column("inclusion_proof").to_pylist()
    if not proofs or any(not p or any(len(h) != 32 for h in p) for p in proofs):
        fail("pyarrow: a row lacks its inclusion proof")
    meta = pq.read_metadata(files[0]).metadata
    if b"custody.block_height" not in meta:
        fail("Parquet footer lacks custody.block_height")
    print(json.dumps({"files": len(files), "statements": sum(got.values()), "kinds": kinds, "first_index": lo, "last_index": hi}))


def tamper(root):
    """Changes the SQL of the first request row with SQL in the newest block file that has one."""
    for path in sorted(glob.glob(os.path.join(root, "blocks", "*.parquet")), reverse=True):
        t = pq.read_table(path)
        sqls = t.column("sql").to_pylist()
        kinds = t.column("kind").to_pylist()
        for i, (k, s) in enumerate(zip(kinds, sqls)):
            if k == "request" and s:
                sqls[i] = "SELECT 'nothing to see here'"
                col = t.schema.get_field_index("sql")
                import pyarrow as pa
                t = t.set_column(col, t.schema.field(col), pa.array(sqls, type=t.schema.field(col).type))
                pq.write_table(t, path)
                print(t.column("index")[i].as_py())
                return
    fail("no request row with SQL to tamper with")


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "tamper":
        tamper(sys.argv[2])
    else:
        fail(f"unknown mode {sys.argv[1]}")
