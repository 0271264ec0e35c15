//! `custody events`, `custody sessions`, `custody checkpoint` and `custody proof`: pull the
//! record over Arrow Flight with the documented JSON ticket, and print it. Verification is in
//! [`crate::audit`].

use std::io::Write;

use anyhow::{anyhow, Context};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow_flight::{FlightClient, Ticket};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use custody_proto::merkle;
use futures::TryStreamExt;
use serde_json::{json, Map, Value};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// One JSON object per line.
    Json,
    /// CSV with a header row.
    Csv,
}

/// Filters shared by `events` and `sessions`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filters {
    /// Start of the time range: RFC 3339, or a duration ago such as `1h` or `30m`.
    #[arg(long)]
    pub since: Option<String>,
    /// End of the time range (exclusive): RFC 3339 or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this session.
    #[arg(long)]
    pub session: Option<String>,
    /// Only this caller (subject or email).
    #[arg(long)]
    pub identity: Option<String>,
    /// Only this resource.
    #[arg(long)]
    pub resource: Option<String>,
    /// Most rows to return.
    #[arg(long)]
    pub limit: Option<u64>,
}

/// Parses a time argument to RFC 3339.
pub fn time_arg(s: &str) -> anyhow::Result<String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_rfc3339());
    }
    let d = humantime::parse_duration(s)
        .map_err(|_| anyhow!("invalid time {s:?}: use RFC 3339 (2026-12-03T10:00:00Z) or a duration ago (90s, 15m, 2h, 7d)"))?;
    let t = chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        .ok_or_else(|| anyhow!("invalid time {s:?}: {s} ago is before any time this can name"))?;
    Ok(t.to_rfc3339())
}

/// Builds a ticket.
pub fn ticket(table: &str, f: &Filters, kind: Option<&str>) -> anyhow::Result<Value> {
    let mut m = Map::new();
    m.insert("table".into(), json!(table));
    if let Some(s) = &f.since {
        m.insert("since".into(), json!(time_arg(s)?));
    }
    if let Some(s) = &f.until {
        m.insert("until".into(), json!(time_arg(s)?));
    }
    if let Some(s) = &f.session {
        m.insert("session_id".into(), json!(s));
    }
    if let Some(s) = &f.identity {
        m.insert("identity".into(), json!(s));
    }
    if let Some(s) = &f.resource {
        m.insert("resource".into(), json!(s));
    }
    if let Some(k) = kind {
        m.insert("kind".into(), json!(k));
    }
    if let Some(l) = f.limit {
        m.insert("limit".into(), json!(l));
    }
    Ok(Value::Object(m))
}

/// Connects to a Flight URL (`grpc://`, `grpc+tcp://` or `http://`).
pub async fn client(url: &str) -> anyhow::Result<FlightClient> {
    let http = if let Some(rest) = url.strip_prefix("grpc+tcp://").or_else(|| url.strip_prefix("grpc://")) {
        format!("http://{rest}")
    } else if let Some(rest) = url.strip_prefix("grpc+tls://") {
        format!("https://{rest}")
    } else {
        url.to_string()
    };
    let ch = tonic::transport::Endpoint::from_shared(http.clone())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the ledger's Flight endpoint {url}"))?;
    let mut c = FlightClient::new(ch);
    // A ledger with `[readers]` wants an auditor's token: send the caller's (CUSTODY_TOKEN or
    // the login cache) when there is one. A ledger without it ignores the header.
    if let Ok((token, _)) = crate::token::resolve(None).await {
        c.add_header("authorization", &format!("Bearer {token}")).context("the token is not a valid header value")?;
    }
    Ok(c)
}

/// Runs a ticket and collects the batches.
pub async fn fetch(url: &str, ticket: &Value) -> anyhow::Result<Vec<RecordBatch>> {
    let mut c = client(url).await?;
    let stream = c
        .do_get(Ticket::new(ticket.to_string()))
        .await
        .map_err(|e| anyhow!("Flight do_get failed: {e}"))?;
    stream.try_collect().await.map_err(|e| anyhow!("reading Flight stream: {e}"))
}

pub(crate) const EVENT_TABLE_COLUMNS: [&str; 13] = [
    "index", "commit_time", "session_id", "seq", "kind", "subject", "resource", "message", "sql", "params", "outcome",
    "command_tag", "rows",
];

/// Prints batches in `format`. For tables, `columns` narrows what is shown.
pub fn print(batches: &[RecordBatch], format: Format, columns: Option<&[&str]>) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        Format::Table => {
            let projected: Vec<RecordBatch> = match columns {
                Some(cols) => batches
                    .iter()
                    .map(|b| {
                        let idx: Vec<usize> = cols.iter().filter_map(|c| b.schema().index_of(c).ok()).collect();
                        b.project(&idx)
                    })
                    .collect::<Result<_, _>>()?,
                None => batches.to_vec(),
            };
            if projected.iter().all(|b| b.num_rows() == 0) {
                writeln!(out, "(no rows)")?;
            } else {
                writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&projected)?)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
            for b in batches {
                w.write(&lists_as_json_text(b)?)?;
            }
        }
    }
    Ok(())
}

/// CSV has no nested types: each list column (groups, params, columns) becomes a UTF-8
/// column holding the list as a JSON array, so that a spreadsheet or `jq` can still read it
/// exactly (a NULL element stays `null`, a NULL list stays an empty cell).
pub fn lists_as_json_text(b: &RecordBatch) -> anyhow::Result<RecordBatch> {
    use arrow::array::{ArrayRef, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let mut fields = Vec::with_capacity(b.num_columns());
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(b.num_columns());
    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
        let DataType::List(_) = f.data_type() else {
            fields.push(f.as_ref().clone());
            cols.push(c.clone());
            continue;
        };
        let list = c.as_list::<i32>();
        let text: StringArray = (0..list.len())
            .map(|i| -> anyhow::Result<Option<String>> {
                if list.is_null(i) {
                    return Ok(None);
                }
                let items = list.value(i);
                let items = arrow::compute::cast(&items, &DataType::Utf8)?;
                let items = items.as_string::<i32>();
                let v: Vec<Value> = (0..items.len())
                    .map(|j| if items.is_null(j) { Value::Null } else { Value::String(items.value(j).to_string()) })
                    .collect();
                Ok(Some(Value::Array(v).to_string()))
            })
            .collect::<anyhow::Result<_>>()?;
        fields.push(Field::new(f.name(), DataType::Utf8, true));
        cols.push(Arc::new(text));
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

/// `custody events`.
pub async fn events(url: &str, f: &Filters, kind: Option<&str>, format: Format, all_columns: bool) -> anyhow::Result<()> {
    let t = ticket("events", f, kind)?;
    let batches = fetch(url, &t).await?;
    let cols = if all_columns { None } else { Some(&EVENT_TABLE_COLUMNS[..]) };
    print(&batches, format, cols)
}

/// `custody sessions`.
pub async fn sessions(url: &str, f: &Filters, format: Format) -> anyhow::Result<()> {
    let t = ticket("sessions", f, None)?;
    let batches = fetch(url, &t).await?;
    let cols = [
        "session_id", "start_time", "status", "subject", "agent", "resource", "database", "statements", "errors", "end_reason",
    ];
    print(&batches, format, Some(&cols[..]))
}

/// Runs the Flight action `name` with a JSON body and returns its JSON answer.
pub async fn action(url: &str, name: &str, body: &Value) -> anyhow::Result<Value> {
    action_on(&mut client(url).await?, name, body).await
}

/// [`action`] on a client already connected.
pub async fn action_on(c: &mut FlightClient, name: &str, body: &Value) -> anyhow::Result<Value> {
    let mut s = c
        .do_action(arrow_flight::Action::new(name.to_string(), body.to_string()))
        .await
        .map_err(|e| anyhow!("ledger {name}: {}", flight_message(&e)))?;
    let b = s
        .try_next()
        .await
        .map_err(|e| anyhow!("ledger {name}: {}", flight_message(&e)))?
        .with_context(|| format!("the ledger returned no answer to {name}"))?;
    serde_json::from_slice(&b).with_context(|| format!("the ledger's answer to {name} is not JSON"))
}

fn flight_message(e: &arrow_flight::error::FlightError) -> String {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => s.message().to_string(),
        other => other.to_string(),
    }
}

pub(crate) fn b64_hash(v: &Value, what: &str) -> anyhow::Result<merkle::Hash> {
    let s = v.as_str().with_context(|| format!("{what} is missing"))?;
    B64.decode(s).ok().and_then(|b| b.try_into().ok()).with_context(|| format!("{what} is not a base64 SHA-256 hash"))
}

pub(crate) fn b64_hashes(v: &Value) -> anyhow::Result<Vec<merkle::Hash>> {
    v.as_array().context("proof is missing")?.iter().enumerate().map(|(i, h)| b64_hash(h, &format!("proof hash {i}"))).collect()
}

/// The inclusion proof of entry `index` in the tree of `size` (default: the ledger's),
/// checked here before it is returned: the entry hashes to the leaf, and the proof leads
/// from the leaf to the root the ledger gave.
pub async fn inclusion_proof(url: &str, index: u64, size: Option<u64>) -> anyhow::Result<Value> {
    inclusion_proof_on(&mut client(url).await?, index, size).await
}

/// [`inclusion_proof`] on a client already connected.
pub async fn inclusion_proof_on(c: &mut FlightClient, index: u64, size: Option<u64>) -> anyhow::Result<Value> {
    let size_asked = size;
    let p = action_on(c, "inclusion_proof", &json!({"index": index, "size": size})).await?;
    let entry = B64.decode(p["entry"].as_str().context("entry is missing")?).context("entry is not base64")?;
    let leaf = custody_proto::entry::stored_leaf(&entry);
    anyhow::ensure!(leaf == b64_hash(&p["leaf_hash"], "leaf_hash")?, "index {index}: the entry does not hash to the leaf hash the ledger gave");
    let size = p["size"].as_u64().context("size is missing")?;
    anyhow::ensure!(p["index"].as_u64() == Some(index), "the ledger answered for index {}, not {index}", p["index"]);
    if let Some(want) = size_asked {
        anyhow::ensure!(size == want, "the ledger answered for size {size}, not {want}");
    }
    merkle::verify_inclusion(index, size, &leaf, &b64_hashes(&p["proof"])?, &b64_hash(&p["root"], "root")?)
        .map_err(|e| anyhow!("index {index}: the inclusion proof does not verify: {e}"))?;
    Ok(p)
}

/// The consistency proof between sizes `first` and `second` (default: the ledger's size),
/// checked here before it is returned.
pub async fn consistency_proof(url: &str, first: u64, second: Option<u64>) -> anyhow::Result<Value> {
    let p = action(url, "consistency_proof", &json!({"first": first, "second": second})).await?;
    let asked = second;
    let second = p["second"].as_u64().context("second is missing")?;
    anyhow::ensure!(p["first"].as_u64() == Some(first), "the ledger answered for first size {}, not {first}", p["first"]);
    if let Some(want) = asked {
        anyhow::ensure!(second == want, "the ledger answered for size {second}, not {want}");
    }
    if first == 0 {
        anyhow::ensure!(b64_hash(&p["first_root"], "first_root")? == merkle::empty_root(), "the root of the empty tree is SHA-256 of nothing");
    }
    merkle::verify_consistency(first, second, &b64_hash(&p["first_root"], "first_root")?, &b64_hash(&p["second_root"], "second_root")?, &b64_hashes(&p["proof"])?)
        .map_err(|e| anyhow!("sizes {first} to {second}: the consistency proof does not verify: {e}"))?;
    Ok(p)
}

/// `custody checkpoint`: asks every ledger node to sign the checkpoint at one size, checks
/// that they sign the same text, and returns one note with all their signatures. With
/// `pinned` keys, every signature by a pinned key must verify and one must be present;
/// without, each node's signature is checked against the key it publishes, and a warning
/// says to pin them.
pub async fn checkpoint(url: &str, size: Option<u64>, pinned: &[String]) -> anyhow::Result<String> {
    use custody_proto::note::{SignedNote, VerifierKey};
    let pinned: Vec<VerifierKey> = pinned.iter().map(|k| VerifierKey::parse(k).with_context(|| format!("--key {k}"))).collect::<Result<_, _>>()?;
    let status = action(url, "status", &json!({})).await?;
    // By default the last block's tree: every node has signed it already, or will at once.
    let size = match (size, status["sealed_size"].as_u64()) {
        (Some(s), _) => s,
        (None, Some(s)) if s > 0 => s,
        (None, _) => status["size"].as_u64().context("the ledger's status has no size")?,
    };
    let mut nodes: Vec<String> = status["members"].as_array().into_iter().flatten().filter_map(|m| m["flight"].as_str().map(str::to_string)).collect();
    if nodes.is_empty() {
        nodes.push(url.to_string());
    }
    let mut merged: Option<SignedNote> = None;
    let mut published: Vec<VerifierKey> = Vec::new();
    for n in &nodes {
        let r = match action(n, "checkpoint", &json!({"size": size})).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("custody: warning: {n} did not sign: {e:#}");
                continue;
            }
        };
        let note = SignedNote::parse(r["note"].as_str().context("no note")?).with_context(|| format!("{n} sent a malformed note"))?;
        let key = VerifierKey::parse(r["verifier_key"].as_str().context("no verifier key")?).with_context(|| format!("{n} sent a malformed verifier key"))?;
        note.verify(std::slice::from_ref(&key)).with_context(|| format!("{n}'s signature does not verify with the key it publishes"))?;
        match &mut merged {
            None => merged = Some(note),
            Some(m) => {
                anyhow::ensure!(m.text == note.text, "{n} signed a different checkpoint at size {size}:\n{}\nthan the others:\n{}", note.text, m.text);
                for s in note.signatures {
                    if !m.signatures.contains(&s) {
                        m.signatures.push(s);
                    }
                }
            }
        }
        published.push(key);
    }
    let note = merged.context("no ledger node signed the checkpoint")?;
    let cp = custody_proto::note::Checkpoint::parse(&note.text)?;
    anyhow::ensure!(cp.size == size, "the checkpoint is for size {}, not {size}", cp.size);
    if pinned.is_empty() {
        eprintln!("custody: warning: no --key given; checked each signature against the key its node publishes:");
        for k in &published {
            eprintln!("  {k}");
        }
    } else {
        let signed = note.verify(&pinned).context("no pinned key signed this checkpoint")?;
        check_quorum(&note, &signed, &pinned)?;
        eprintln!("custody: verified signatures by {} of {} pinned keys", signed.len(), pinned.len());
    }
    Ok(note.encode())
}

/// A checkpoint counts only when a majority of the pinned signers (distinct key names: a
/// node's old and new key after a rotation are one signer) signed it, so that no single node
/// can vouch for a tree alone. A pinned name that signed with a key id not pinned (a rotated
/// key) is named, so that its new key can be pinned.
pub fn check_quorum(note: &custody_proto::note::SignedNote, signed: &[String], pinned: &[custody_proto::note::VerifierKey]) -> anyhow::Result<()> {
    let mut names: Vec<&str> = pinned.iter().map(|k| k.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for s in &note.signatures {
        if names.contains(&s.name.as_str()) && !signed.contains(&s.name) && !pinned.iter().any(|k| k.name == s.name && k.id == s.key_id) {
            eprintln!(
                "custody: warning: {} signed with key id {} which is not pinned (was its key rotated? its new key is in the ledger's status)",
                s.name,
                s.key_id.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
        }
    }
    let need = names.len() / 2 + 1;
    if signed.len() < need {
        let missing: Vec<&str> = names.iter().copied().filter(|n| !signed.iter().any(|s| s == n)).collect();
        anyhow::bail!(
            "only {} of {} pinned signers signed this checkpoint (a majority, {need}, is needed); missing: {}",
            signed.len(),
            names.len(),
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod time_arg_tests {
    use super::time_arg;

    #[test]
    fn a_duration_ago_beyond_any_time_is_an_error_not_a_panic() {
        assert!(time_arg("15m").is_ok());
        assert!(time_arg("2026-12-03T10:00:00Z").is_ok());
        for bad in ["9999999999d", "99999999999999999999d", "yesterday", ""] {
            assert!(time_arg(bad).is_err(), "{bad}");
        }
    }
}
