//! Verifying the ledger as an auditor: `custody verify` (online, and `--offline` on an export
//! bundle), `custody bundle`, `custody blocks`, and `custody events --verify`.
//!
//! Trust starts from pinned verifier keys only. A checkpoint counts once a pinned key's
//! signature on it verifies and it is consistent with the last checkpoint this machine
//! verified (kept in `<custody home>/verified/<origin>.checkpoint`, as immudb clients keep
//! their verified state). Everything else the ledger serves is checked against it.
//!
//! # Bundle layout (`custody bundle --out DIR`)
//! - `checkpoint`: the signed note, byte for byte as the nodes signed it.
//! - `manifest.json`: `{"format": "custody-bundle/1", "origin", "size", "from", "to"}`.
//! - `entries.jsonl`: one `{"index", "entry"}` per line (entry: base64 canonical bytes), for
//!   indices `from..to`; when the range is not the whole tree, each line also has `"proof"`,
//!   the RFC 6962 inclusion proof in the checkpoint's tree.
//! - `blocks.jsonl`: `{"header"}` (base64 canonical block header) for every block within the
//!   checkpoint.
//! - `consistency.jsonl`: `{"first", "proof"}` consistency proofs from earlier sizes to the
//!   checkpoint's (`--consistency-from`), so that an offline verifier can link its own last
//!   verified checkpoint.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::UInt64Type;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use custody_proto::block::BlockHeader;
use custody_proto::entry::{entry_hash, hex, ChainVerifier, Entry};
use custody_proto::merkle::{self, Hash, MemoryTree};
use custody_proto::note::{Checkpoint, SignedNote, VerifierKey};
use prost::Message;
use serde_json::{json, Value};

use crate::query::{action, b64_hash, b64_hashes, checkpoint, fetch, print, Filters, Format};

const BUNDLE_FORMAT: &str = "custody-bundle/1";

/// The last checkpoint this machine verified for `origin`, if any.
fn last_verified(origin: &str) -> anyhow::Result<Option<Checkpoint>> {
    let path = crate::config::verified_path(origin);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let cp = SignedNote::parse(&text).and_then(|n| Checkpoint::parse(&n.text)).with_context(|| format!("{} is not a checkpoint", path.display()))?;
    Ok(Some(cp))
}

/// Checks `cp` against `last` (the checkpoint verified before): the log may not shrink, the
/// same size must have the same root, and `proof` (from `last.size` to `cp.size`) must link
/// the two.
fn check_extends(last: &Checkpoint, cp: &Checkpoint, proof: Option<&[Hash]>) -> anyhow::Result<bool> {
    let path = crate::config::verified_path(&cp.origin);
    if last.size > cp.size {
        bail!(
            "the checkpoint (size {}) is older than the one this machine verified before (size {}, in {}): the log shrank or this is another view of it",
            cp.size,
            last.size,
            path.display()
        );
    }
    if last.size == cp.size {
        anyhow::ensure!(last.root == cp.root, "FORK: size {} had root {} when this machine verified it, and now {}", cp.size, B64.encode(last.root), B64.encode(cp.root));
        return Ok(true);
    }
    let Some(proof) = proof else { return Ok(false) };
    merkle::verify_consistency(last.size, cp.size, &last.root, &cp.root, proof)
        .map_err(|e| anyhow!("HISTORY REWRITTEN: the checkpoint at size {} does not extend the one verified before at size {}: {e}", cp.size, last.size))?;
    Ok(true)
}

pub(crate) fn save_verified(origin: &str, note: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = crate::config::verified_path(origin);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(note.as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A checkpoint signed by pinned keys and consistent with the last one verified here.
pub(crate) struct Trusted {
    pub(crate) cp: Checkpoint,
    pub(crate) note: String,
}

/// Fetches the checkpoint at `size` (default: the last block's), checks its signatures
/// against `keys`, and checks it extends the last checkpoint this machine verified.
pub(crate) async fn trusted_checkpoint(url: &str, size: Option<u64>, keys: &[String]) -> anyhow::Result<Trusted> {
    let note = checkpoint(url, size, keys).await?;
    let cp = Checkpoint::parse(&SignedNote::parse(&note)?.text)?;
    if let Some(last) = last_verified(&cp.origin)? {
        let proof = if last.size < cp.size {
            let p = action(url, "consistency_proof", &json!({"first": last.size, "second": cp.size})).await?;
            Some(b64_hashes(&p["proof"])?)
        } else {
            None
        };
        check_extends(&last, &cp, proof.as_deref())?;
    }
    Ok(Trusted { cp, note })
}

/// Entries `from..to` as (index, canonical bytes), in index order as served.
async fn pull_entries(url: &str, from: u64, to: u64) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
    if to <= from {
        return Ok(Vec::new());
    }
    let batches = fetch(url, &json!({"table": "entries", "from_index": from, "limit": to - from})).await?;
    let mut out = Vec::with_capacity((to - from) as usize);
    for b in &batches {
        let (Some(idx), Some(entries)) = (
            b.column_by_name("index").and_then(|c| c.as_primitive_opt::<UInt64Type>()),
            b.column_by_name("entry").and_then(|c| c.as_binary_opt::<i32>()),
        ) else {
            bail!("the ledger's entries table does not have the expected (index u64, entry binary) columns");
        };
        for i in 0..b.num_rows() {
            if entries.is_null(i) {
                bail!("index {}: entry has no bytes", idx.value(i));
            }
            out.push((idx.value(i), entries.value(i).to_vec()));
        }
    }
    Ok(out)
}

/// Every index from `from` present once and in order, up to `to`.
fn check_indices(entries: &[(u64, Vec<u8>)], from: u64, to: u64) -> anyhow::Result<()> {
    for (pos, (index, _)) in entries.iter().enumerate() {
        let want = from + pos as u64;
        if *index > want {
            bail!("index {want}: entry missing (the next entry found is {index}); the log was truncated or an entry deleted");
        }
        if *index != want {
            bail!("index {want}: entry {index} found in its place; entries are out of order or repeated");
        }
    }
    let got = from + entries.len() as u64;
    if got < to {
        bail!("index {got}: entries end here, but {to} were expected; the log was truncated or entries deleted");
    }
    Ok(())
}

/// The first index at which `tree` stops agreeing with the signed tree `(cp.size, cp.root)`,
/// found by bisection with consistency proofs: a prefix of size k agrees exactly when a
/// consistency proof from its root to the signed root verifies. Proofs come from `proof_url`;
/// their soundness does not depend on who serves them.
async fn first_disagreement(proof_url: &str, tree: &MemoryTree, cp: &Checkpoint) -> anyhow::Result<u64> {
    let (mut agree, mut differ) = (0u64, cp.size);
    while differ - agree > 1 {
        let mid = agree + (differ - agree) / 2;
        let mine = merkle::root(tree, mid).map_err(|e| anyhow!("{e}"))?;
        let ok = match action(proof_url, "consistency_proof", &json!({"first": mid, "second": cp.size})).await {
            Ok(p) => b64_hashes(&p["proof"]).is_ok_and(|proof| merkle::verify_consistency(mid, cp.size, &mine, &cp.root, &proof).is_ok()),
            Err(_) => false,
        };
        if ok {
            agree = mid;
        } else {
            differ = mid;
        }
    }
    Ok(agree)
}

/// Checks every block header: each follows the one before and commits to the root the
/// entries give at its size. Returns how many were checked.
fn check_blocks(headers: &[BlockHeader], tree: &MemoryTree) -> anyhow::Result<u64> {
    let mut prev: Option<&BlockHeader> = None;
    for b in headers {
        b.check_follows(prev).map_err(|e| anyhow!("index {}: {e}", b.first_index))?;
        if b.tree_size <= tree.size() {
            let root = merkle::root(tree, b.tree_size).map_err(|e| anyhow!("{e}"))?;
            anyhow::ensure!(
                root == b.root,
                "index {}: block {} commits to root {} for entries up to {}, but the entries give {}",
                b.first_index,
                b.height,
                B64.encode(b.root),
                b.tree_size,
                B64.encode(root)
            );
        }
        prev = Some(b);
    }
    Ok(headers.len() as u64)
}

/// Every block header the ledger serves, with its canonical bytes checked.
pub(crate) async fn pull_blocks(url: &str) -> anyhow::Result<Vec<BlockHeader>> {
    let mut out: Vec<BlockHeader> = Vec::new();
    loop {
        let r = action(url, "blocks", &json!({"from": out.len(), "limit": 10_000})).await?;
        let page = r["blocks"].as_array().context("the ledger's blocks answer has no blocks")?;
        for v in page {
            let bytes = B64.decode(v["header"].as_str().context("a block has no header")?).context("a block header is not base64")?;
            out.push(BlockHeader::decode(&bytes).with_context(|| format!("block {}", out.len()))?);
        }
        if page.len() < 10_000 {
            return Ok(out);
        }
    }
}

/// `custody verify`: the signed checkpoint (with pinned keys), every entry against it (the
/// first index that does not match is named), the hash chain, the blocks, and the head and
/// root the ledger reports.
pub async fn verify(url: &str, keys: &[String]) -> anyhow::Result<()> {
    let trusted = if keys.is_empty() {
        eprintln!("custody: warning: no pinned ledger keys (--key, or ledger_keys in the config): checkpoints are not checked");
        None
    } else {
        Some(trusted_checkpoint(url, None, keys).await?)
    };
    let status = action(url, "status", &json!({})).await?;
    let size = status["size"].as_u64().unwrap_or(0);
    // Only the entries the status covers: appends may go on during the pull.
    let entries = pull_entries(url, 0, size).await?;
    check_indices(&entries, 0, size)?;
    let mut tree = MemoryTree::new();
    for (_, e) in &entries {
        tree.push(custody_proto::entry::stored_leaf(e));
    }
    if let Some(t) = &trusted {
        let cp = &t.cp;
        if cp.size > tree.size() {
            bail!("index {}: the signed checkpoint covers {} entries, the ledger served {}; the log was truncated", tree.size(), cp.size, tree.size());
        }
        if merkle::root(&tree, cp.size).map_err(|e| anyhow!("{e}"))? != cp.root {
            let others: Vec<String> = status["members"].as_array().into_iter().flatten().filter_map(|m| m["flight"].as_str()).filter(|f| *f != url).map(str::to_string).collect();
            let proof_url = others.first().map(String::as_str).unwrap_or(url);
            let bad = first_disagreement(proof_url, &tree, cp).await?;
            bail!(
                "index {bad}: entry does not match the signed checkpoint (size {}): its bytes were changed, or entries were reordered or replaced (entries before {bad} match)",
                cp.size
            );
        }
    }
    let mut chain = ChainVerifier::new();
    for (_, e) in &entries {
        chain.push(e).map_err(|e| anyhow!("{e}"))?;
    }
    let head = hex(&chain.head());
    if size > 0 && status["head_hash"].as_str() != Some(head.as_str()) {
        bail!("chain head mismatch: ledger reports {}, entries hash to {head}", status["head_hash"]);
    }
    let root = tree.root();
    if b64_hash(&status["tree_root"], "the ledger's tree_root")? != root {
        bail!("merkle root mismatch at size {size}: the ledger reports {}, its entries give {}", status["tree_root"], B64.encode(root));
    }
    let blocks = pull_blocks(url).await?;
    let checked = check_blocks(&blocks, &tree)?;
    if let Some(t) = &trusted {
        save_verified(&t.cp.origin, &t.note)?;
        println!("ok: signed checkpoint at size {} verified and consistent with the last one this machine verified", t.cp.size);
    }
    println!("ok: {size} entries verified; {checked} blocks; chain head {head}; merkle root {}", B64.encode(root));
    Ok(())
}

/// `custody blocks`: block headers, checked to link one to the next.
pub async fn blocks(url: &str, json_out: bool) -> anyhow::Result<()> {
    let blocks = pull_blocks(url).await?;
    let mut prev = None;
    for b in &blocks {
        b.check_follows(prev).map_err(|e| anyhow!("{e}"))?;
        prev = Some(b);
        if json_out {
            println!(
                "{}",
                json!({"height": b.height, "first_index": b.first_index, "count": b.count, "tree_size": b.tree_size, "root": B64.encode(b.root),
                       "prev_hash": B64.encode(b.prev_hash), "hash": B64.encode(b.hash()), "sealed_at_ns": b.sealed_at_ns, "header": B64.encode(b.encode())})
            );
        } else {
            let t = chrono::DateTime::from_timestamp_nanos(b.sealed_at_ns).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            println!("{:>6}  entries {:>8}..{:<8}  root {}  sealed {t}", b.height, b.first_index, b.tree_size, B64.encode(b.root));
        }
    }
    if blocks.is_empty() && !json_out {
        println!("(no blocks yet)");
    }
    Ok(())
}

/// Checks `proofs` (the `inclusion_proofs` answer's entries) against the trusted checkpoint.
fn check_proofs(proofs: &Value, cp: &Checkpoint) -> anyhow::Result<Vec<(u64, Vec<u8>, Vec<Hash>)>> {
    let mut out = Vec::new();
    for p in proofs.as_array().context("the ledger's answer has no proofs")? {
        let index = p["index"].as_u64().context("a proof has no index")?;
        let entry = B64.decode(p["entry"].as_str().context("a proof has no entry")?).context("entry is not base64")?;
        let proof = b64_hashes(&p["proof"])?;
        merkle::verify_inclusion(index, cp.size, &custody_proto::entry::stored_leaf(&entry), &proof, &cp.root)
            .map_err(|e| anyhow!("index {index}: the entry is not in the signed checkpoint (size {}): {e}", cp.size))?;
        out.push((index, entry, proof));
    }
    Ok(out)
}

/// Inclusion proofs of `indices` in the trusted checkpoint's tree, each checked.
pub(crate) async fn proven_entries(url: &str, indices: &[u64], cp: &Checkpoint) -> anyhow::Result<Vec<(u64, Vec<u8>, Vec<Hash>)>> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(1000) {
        let r = action(url, "inclusion_proofs", &json!({"indices": chunk, "size": cp.size})).await?;
        anyhow::ensure!(r["size"].as_u64() == Some(cp.size), "the ledger answered for size {}, not {}", r["size"], cp.size);
        let got = check_proofs(&r["proofs"], cp)?;
        anyhow::ensure!(got.iter().map(|g| g.0).eq(chunk.iter().copied()), "the ledger's proofs are not for the indices asked");
        out.extend(got);
    }
    Ok(out)
}

fn str_col<'a>(b: &'a RecordBatch, name: &str) -> Option<&'a arrow::array::StringArray> {
    b.column_by_name(name).and_then(|c| c.as_string_opt::<i32>())
}

/// `custody events --verify`: every event printed is proven to be in a checkpoint signed by
/// pinned keys, and the row matches the proven entry (its hash, session, sequence and SQL).
pub async fn events_verified(url: &str, f: &Filters, kind: Option<&str>, format: Format, all_columns: bool, keys: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(!keys.is_empty(), "--verify needs pinned ledger keys (--key, or ledger_keys in the config)");
    let t = crate::query::ticket("events", f, kind)?;
    let batches = fetch(url, &t).await?;
    let mut indices = Vec::new();
    for b in &batches {
        let idx = b.column_by_name("index").and_then(|c| c.as_primitive_opt::<UInt64Type>()).context("the events table has no index column")?;
        indices.extend(idx.values().iter().copied());
    }
    if !indices.is_empty() {
        let status = action(url, "status", &json!({})).await?;
        let size = status["size"].as_u64().context("the ledger's status has no size")?;
        let trusted = trusted_checkpoint(url, Some(size), keys).await?;
        let proven = proven_entries(url, &indices, &trusted.cp).await?;
        let mut at = 0usize;
        for b in &batches {
            let hashes = b.column_by_name("entry_hash").and_then(|c| c.as_fixed_size_binary_opt()).context("the events table has no entry_hash column")?;
            let (sessions, seqs, sqls) = (str_col(b, "session_id"), b.column_by_name("seq").and_then(|c| c.as_primitive_opt::<UInt64Type>()), str_col(b, "sql"));
            let (Some(sessions), Some(seqs)) = (sessions, seqs) else { bail!("the events table lacks session_id or seq") };
            for row in 0..b.num_rows() {
                let (index, bytes, _) = &proven[at];
                at += 1;
                let bad = |what: &str| anyhow!("index {index}: the printed row's {what} is not the proven entry's");
                if custody_proto::entry::is_pruned(bytes) {
                    // Only the hashes are left in hot storage (retention): the row can be
                    // proven, its payload is in the export.
                    let p = custody_proto::entry::PrunedEntry::decode(bytes).map_err(|e| anyhow!("index {index}: {e}"))?;
                    if hashes.value(row) != p.entry_hash {
                        return Err(bad("entry hash"));
                    }
                    continue;
                }
                if hashes.value(row) != entry_hash(bytes) {
                    return Err(bad("entry hash"));
                }
                let e = Entry::decode(bytes).map_err(|e| anyhow!("index {index}: {e}"))?;
                let ev = custody_proto::Event::decode(e.event).map_err(|e| anyhow!("index {index}: the proven entry's event does not decode: {e}"))?;
                if sessions.value(row) != ev.session_id {
                    return Err(bad("session id"));
                }
                if seqs.value(row) != ev.seq {
                    return Err(bad("sequence number"));
                }
                if let (Some(sqls), Some(custody_proto::pb::v1::event::Body::PgRequest(r))) = (sqls, &ev.body) {
                    if !sqls.is_null(row) && sqls.value(row) != r.sql {
                        return Err(bad("SQL"));
                    }
                }
            }
        }
        save_verified(&trusted.cp.origin, &trusted.note)?;
        eprintln!("custody: verified: {} events are in the checkpoint at size {} signed by pinned keys", proven.len(), trusted.cp.size);
    }
    let cols = if all_columns { None } else { Some(&crate::query::EVENT_TABLE_COLUMNS[..]) };
    print(&batches, format, cols)
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// `custody bundle`: writes an export bundle for offline verification (see the module docs).
pub async fn bundle(url: &str, out: &Path, from: Option<u64>, to: Option<u64>, consistency_from: &[u64], keys: &[String]) -> anyhow::Result<()> {
    let note = checkpoint(url, None, keys).await?;
    let cp = Checkpoint::parse(&SignedNote::parse(&note)?.text)?;
    let from = from.unwrap_or(0);
    let to = to.unwrap_or(cp.size);
    anyhow::ensure!(from < to, "--from {from} must be before --to {to} (the range is from..to, to exclusive)");
    anyhow::ensure!(to <= cp.size, "--to {to} is beyond the checkpoint's {} entries", cp.size);
    if let Some(bad) = consistency_from.iter().find(|f| **f > cp.size) {
        bail!("--consistency-from {bad} is beyond the checkpoint's {} entries", cp.size);
    }
    // Written whole into a fresh directory beside OUT, then moved there: a failure leaves no
    // half-written bundle.
    anyhow::ensure!(!out.exists() || std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false), "{} exists and is not empty; bundles are written to a new directory", out.display());
    let final_out = out.to_path_buf();
    let tmp = final_out.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let out = tmp.as_path();
    let entries = pull_entries(url, from, to).await?;
    check_indices(&entries, from, to)?;
    let whole = from == 0 && to == cp.size;
    let mut lines = String::new();
    if whole {
        let mut tree = MemoryTree::new();
        for (index, e) in &entries {
            tree.push(custody_proto::entry::stored_leaf(e));
            lines.push_str(&json!({"index": index, "entry": B64.encode(e)}).to_string());
            lines.push('\n');
        }
        anyhow::ensure!(tree.root() == cp.root, "the entries the ledger served do not give the signed root; run `custody verify` to find where");
    } else {
        let indices: Vec<u64> = entries.iter().map(|e| e.0).collect();
        for (index, e, proof) in proven_entries(url, &indices, &cp).await? {
            lines.push_str(&json!({"index": index, "entry": B64.encode(&e), "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>()}).to_string());
            lines.push('\n');
        }
    }
    write_file(&out.join("entries.jsonl"), lines.as_bytes())?;
    let mut blocks = String::new();
    let mut n_blocks = 0u64;
    for b in pull_blocks(url).await?.iter().filter(|b| b.tree_size <= cp.size) {
        blocks.push_str(&json!({"header": B64.encode(b.encode())}).to_string());
        blocks.push('\n');
        n_blocks += 1;
    }
    write_file(&out.join("blocks.jsonl"), blocks.as_bytes())?;
    let mut cons = String::new();
    for first in consistency_from {
        let p = action(url, "consistency_proof", &json!({"first": first, "second": cp.size})).await?;
        cons.push_str(&json!({"first": first, "proof": p["proof"]}).to_string());
        cons.push('\n');
    }
    write_file(&out.join("consistency.jsonl"), cons.as_bytes())?;
    let manifest = json!({"format": BUNDLE_FORMAT, "origin": cp.origin, "size": cp.size, "from": from, "to": to, "blocks": n_blocks});
    write_file(&out.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    write_file(&out.join("checkpoint"), note.as_bytes())?;
    let _ = std::fs::remove_dir(&final_out);
    std::fs::rename(out, &final_out).with_context(|| format!("moving {} to {}", out.display(), final_out.display()))?;
    println!("wrote {}: entries {from}..{to} of the checkpoint at size {}", final_out.display(), cp.size);
    Ok(())
}

fn jsonl(path: &Path) -> anyhow::Result<Vec<Value>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| format!("{} line {}: not JSON", path.display(), n + 1))?);
    }
    Ok(out)
}

fn manifest_origin_ok(dir: &Path, cp: &Checkpoint) -> anyhow::Result<bool> {
    let m: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).with_context(|| format!("reading {}/manifest.json", dir.display()))?)
        .context("manifest.json is not JSON")?;
    Ok(m["origin"].as_str() == Some(cp.origin.as_str()) && m["size"].as_u64() == Some(cp.size))
}

/// `custody verify --offline DIR`: the same checks as online, on an export bundle.
pub fn verify_offline(dir: &Path, keys: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(!keys.is_empty(), "offline verification needs pinned ledger keys (--key, or ledger_keys in the config): a bundle's own keys prove nothing");
    let pinned: Vec<VerifierKey> = keys.iter().map(|k| VerifierKey::parse(k).with_context(|| format!("--key {k}"))).collect::<Result<_, _>>()?;
    let note_text = std::fs::read_to_string(dir.join("checkpoint")).with_context(|| format!("reading {}/checkpoint", dir.display()))?;
    let note = SignedNote::parse(&note_text).context("the bundle's checkpoint is not a signed note")?;
    anyhow::ensure!(!note.signatures.is_empty(), "the bundle's checkpoint carries no signatures");
    let signers = note.verify(&pinned).context("no pinned key signed the bundle's checkpoint")?;
    crate::query::check_quorum(&note, &signers, &pinned)?;
    let cp = Checkpoint::parse(&note.text)?;
    anyhow::ensure!(manifest_origin_ok(dir, &cp)?, "manifest.json does not describe this checkpoint (origin and size must match it)");
    let manifest: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).with_context(|| format!("reading {}/manifest.json", dir.display()))?)
        .context("manifest.json is not JSON")?;
    anyhow::ensure!(manifest["format"] == BUNDLE_FORMAT, "not a {BUNDLE_FORMAT} bundle (format {})", manifest["format"]);
    let (from, to) = (manifest["from"].as_u64().context("manifest has no from")?, manifest["to"].as_u64().context("manifest has no to")?);
    anyhow::ensure!(from <= to && to <= cp.size, "the manifest's range {from}..{to} is not within the checkpoint's {} entries", cp.size);

    let mut entries = Vec::new();
    let mut proofs = Vec::new();
    for v in jsonl(&dir.join("entries.jsonl"))? {
        let index = v["index"].as_u64().with_context(|| format!("entries.jsonl line {}: no index, or not a non-negative integer", entries.len() + 1))?;
        let e = B64.decode(v["entry"].as_str().with_context(|| format!("index {index}: no entry"))?).with_context(|| format!("index {index}: entry is not base64"))?;
        if !v["proof"].is_null() {
            proofs.push(b64_hashes(&v["proof"]).with_context(|| format!("index {index}"))?);
        }
        entries.push((index, e));
    }
    check_indices(&entries, from, to)?;
    anyhow::ensure!(entries.len() as u64 == to - from, "index {}: the bundle holds more entries than its manifest says", to);
    let whole = from == 0 && to == cp.size;
    let mut tree = MemoryTree::new();
    if whole {
        for (_, e) in &entries {
            tree.push(custody_proto::entry::stored_leaf(e));
        }
    } else {
        anyhow::ensure!(proofs.len() == entries.len(), "a partial bundle needs an inclusion proof on every entry line");
    }
    // Each entry's place in the signed tree.
    if whole {
        if tree.root() != cp.root {
            // Name where it goes wrong: the chain check below finds a changed, missing or
            // reordered entry; if the chain holds, the entries were rewritten wholesale.
            let mut chain = ChainVerifier::new();
            for (_, e) in &entries {
                chain.push(e).map_err(|e| anyhow!("{e}"))?;
            }
            bail!("the entries do not give the signed root at size {}: the whole chain was rewritten", cp.size);
        }
    } else {
        for ((index, e), proof) in entries.iter().zip(&proofs) {
            merkle::verify_inclusion(*index, cp.size, &custody_proto::entry::stored_leaf(e), proof, &cp.root)
                .map_err(|err| anyhow!("index {index}: the entry is not in the signed checkpoint (size {}): {err}", cp.size))?;
        }
    }
    // The chain within the range (from the first entry's own link when the range starts later).
    let mut chain = match entries.first() {
        Some((i, e)) if *i > 0 => ChainVerifier::resume(*i, Entry::decode(e).map_err(|err| anyhow!("index {i}: {err}"))?.prev_hash),
        _ => ChainVerifier::new(),
    };
    for (_, e) in &entries {
        chain.push(e).map_err(|e| anyhow!("{e}"))?;
    }
    // Blocks (only those the entries reach can be checked against roots).
    let mut headers = Vec::new();
    for (n, v) in jsonl(&dir.join("blocks.jsonl"))?.iter().enumerate() {
        let bytes = B64.decode(v["header"].as_str().context("a block line has no header")?).with_context(|| format!("blocks.jsonl line {}", n + 1))?;
        headers.push(BlockHeader::decode(&bytes).with_context(|| format!("blocks.jsonl line {}", n + 1))?);
    }
    // Every bundle's headers must link, and the manifest says how many it holds; a whole
    // bundle also checks each root against the entries.
    let mut prev = None;
    for b in &headers {
        b.check_follows(prev).map_err(|e| anyhow!("blocks.jsonl: {e}"))?;
        anyhow::ensure!(b.tree_size <= cp.size, "blocks.jsonl: block {} goes beyond the checkpoint's {} entries", b.height, cp.size);
        if b.tree_size == cp.size {
            anyhow::ensure!(b.root == cp.root, "blocks.jsonl: block {} commits to another root than the signed checkpoint at the same size", b.height);
        }
        prev = Some(b);
    }
    if let Some(n) = manifest["blocks"].as_u64() {
        anyhow::ensure!(headers.len() as u64 == n, "the bundle holds {} block headers, its manifest says {n}", headers.len());
    }
    let checked = if whole { check_blocks(&headers, &tree)? } else { headers.len() as u64 };
    // Consistency with what this machine verified before. An older checkpoint than that is
    // verified on its own (an old export) and leaves the remembered one alone.
    let mut remember = true;
    if let Some(last) = last_verified(&cp.origin)?.filter(|l| l.size > cp.size) {
        remember = false;
        eprintln!(
            "custody: note: this bundle's checkpoint (size {}) is older than the one this machine verified (size {}); it is checked on its own, not linked to it",
            cp.size, last.size
        );
    } else if let Some(last) = last_verified(&cp.origin)? {
        let proof = if whole && last.size <= cp.size {
            // The entries themselves give the old root.
            let old = merkle::root(&tree, last.size).map_err(|e| anyhow!("{e}"))?;
            anyhow::ensure!(old == last.root, "HISTORY REWRITTEN: the bundle's first {} entries do not give the root this machine verified for that size", last.size);
            Some(Vec::new())
        } else {
            let mut found = None;
            for v in jsonl(&dir.join("consistency.jsonl"))? {
                if v["first"].as_u64() == Some(last.size) {
                    found = Some(b64_hashes(&v["proof"])?);
                }
            }
            found
        };
        let linked = match proof {
            Some(p) if p.is_empty() && whole => true,
            Some(p) => check_extends(&last, &cp, Some(&p))?,
            None => check_extends(&last, &cp, None)?,
        };
        if !linked {
            remember = false;
            eprintln!(
                "custody: warning: cannot link this checkpoint to the one verified before (size {}): the bundle starts after entry 0 and has no consistency proof from that size (export it with --consistency-from {}); the remembered checkpoint is kept",
                last.size, last.size
            );
        }
    }
    if remember {
        save_verified(&cp.origin, &note_text)?;
    }
    println!("ok: checkpoint at size {} signed by {}", cp.size, signers.join(", "));
    println!("ok: entries {from}..{to} verified offline ({} with inclusion proofs); {checked} blocks checked{}", if whole { 0 } else { entries.len() }, if whole { "" } else { " (links only: their roots need the whole log)" });
    Ok(())
}
