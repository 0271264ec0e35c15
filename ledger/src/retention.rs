//! Retention: the leader removes event payloads from hot storage once a verified export to
//! the configured archive holds them and they are older than the policy.
//!
//! ```toml
//! [retention]
//! archive = "s3://audit-lake/custody"   # exactly as `custody export` names the target
//! prune_after = "30d"                   # blocks sealed longer ago than this
//! interval_s = 60
//! ```
//!
//! What is pruned, and what is not:
//! - only entries below the end of the contiguous prefix (from entry 0) that `export` records
//!   for the archive cover, and only whole blocks sealed more than `prune_after` ago;
//! - before proposing, the leader reads the archive itself: the recorded manifest must have
//!   the recorded SHA-256, its checkpoint must be this ledger's own tree at that size, its
//!   block headers this ledger's own, and each block file the SHA-256 the manifest gives. An
//!   archive that does not match prunes nothing and says why;
//! - sessions under a legal hold keep their payloads (checked again on apply);
//! - the Merkle leaves and chain hashes stay (`custody_proto::entry::PrunedEntry`), so every
//!   inclusion and consistency proof still holds;
//! - each prune is itself an event (`prune`: the range, the archive, the manifest, the policy).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use custody_proto::block::BlockHeader;
use custody_proto::note::{Checkpoint, SignedNote};
use custody_proto::pb::v1::{event, EventKind, ExportRecord, Prune, Protocol};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use prost::Message;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::machine::StoreCell;
use crate::node::NodeHandle;
use crate::store::Store;

/// `[retention]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// The export target whose exports count: `file:///dir` or `s3://bucket/prefix`, as
    /// `custody export` records it (a directory is recorded as `file://` and its absolute path).
    pub archive: String,
    /// Prune payloads of blocks sealed longer ago than this (`30d`, `12h`; `0s`: as soon as
    /// they are exported).
    pub prune_after: String,
    /// Seconds between checks.
    #[serde(default = "default_interval")]
    pub interval_s: u64,
    /// Most entries one prune command covers.
    #[serde(default = "default_chunk")]
    pub max_entries: u64,
}

fn default_interval() -> u64 {
    60
}
fn default_chunk() -> u64 {
    10_000
}

impl RetentionConfig {
    /// Checks the settings.
    pub fn validate(&self) -> anyhow::Result<Duration> {
        match self.archive.strip_prefix("s3://") {
            Some(rest) => anyhow::ensure!(!rest.split('/').next().unwrap_or("").is_empty(), "[retention] archive {:?}: no bucket (s3://bucket/prefix)", self.archive),
            None => {
                let dir = self.archive.strip_prefix("file://").with_context(|| format!("[retention] archive {:?}: expected file:///abs/dir or s3://bucket/prefix", self.archive))?;
                anyhow::ensure!(dir.starts_with('/'), "[retention] archive {:?}: a file:// archive needs an absolute path (file:///var/lib/...)", self.archive);
            }
        }
        anyhow::ensure!(self.interval_s > 0, "[retention] interval_s must be at least 1");
        anyhow::ensure!(self.max_entries > 0, "[retention] max_entries must be at least 1");
        humantime::parse_duration(&self.prune_after).with_context(|| format!("[retention] prune_after {:?} is not a duration (30d, 12h, 0s)", self.prune_after))
    }
}

/// The archive's object store and the prefix within it.
fn open_archive(url: &str) -> anyhow::Result<(Arc<dyn ObjectStore>, ObjPath)> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let s = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build().with_context(|| format!("{url}: S3 client (check the AWS_* variables)"))?;
        return Ok((Arc::new(s), ObjPath::from(prefix.trim_matches('/'))));
    }
    let dir = url.strip_prefix("file://").with_context(|| format!("{url}: expected file:///dir or s3://bucket/prefix"))?;
    anyhow::ensure!(dir.starts_with('/'), "{url}: a file:// archive needs an absolute path");
    let s = object_store::local::LocalFileSystem::new_with_prefix(dir).with_context(|| format!("{url}: not a directory"))?;
    Ok((Arc::new(s), ObjPath::default()))
}

async fn read(store: &dyn ObjectStore, prefix: &ObjPath, rel: &str) -> anyhow::Result<Vec<u8>> {
    let mut p = prefix.clone();
    for part in rel.split('/') {
        anyhow::ensure!(!part.is_empty() && part != "..", "{rel}: not a path inside the archive");
        p = p.join(part);
    }
    let r = store.get(&p).await.with_context(|| format!("reading {rel}"))?;
    Ok(r.bytes().await.with_context(|| format!("reading {rel}"))?.to_vec())
}

#[derive(Deserialize)]
struct ManifestBlock {
    height: u64,
    header: String,
    file: String,
    sha256: String,
}

#[derive(Deserialize)]
struct Manifest {
    checkpoint: String,
    size: u64,
    blocks: Vec<ManifestBlock>,
}

/// Checks that the archive holds what `rec` says was exported, against this ledger's own tree
/// and blocks, and returns how far from `from` (at most `end`) the manifest's blocks hold
/// every entry without a gap. A record is only a claim: this is what makes it true.
pub async fn check_archive(url: &str, rec: &ExportRecord, store: &Store, from: u64, end: u64) -> anyhow::Result<u64> {
    let (os, prefix) = open_archive(url)?;
    let bytes = read(os.as_ref(), &prefix, &rec.manifest).await?;
    anyhow::ensure!(hex::encode(Sha256::digest(&bytes)) == rec.manifest_sha256, "{}: its SHA-256 is not the one recorded at export", rec.manifest);
    let m: Manifest = serde_json::from_slice(&bytes).with_context(|| format!("{} is not an export manifest", rec.manifest))?;
    let cp = Checkpoint::parse(&SignedNote::parse(&m.checkpoint)?.text)?;
    anyhow::ensure!(cp.size == m.size && cp.size == rec.checkpoint_size, "{}: checkpoint size {} is not the recorded {}", rec.manifest, cp.size, rec.checkpoint_size);
    let own = custody_proto::merkle::root(&crate::state::StoredTree(store), cp.size).map_err(|e| anyhow!("this ledger's tree at size {}: {e}", cp.size))?;
    anyhow::ensure!(own == cp.root, "{}: its checkpoint's root is not this ledger's tree at size {}", rec.manifest, cp.size);
    let mut headers = Vec::new();
    for b in &m.blocks {
        let header = BlockHeader::decode(&B64.decode(&b.header).context("block header is not base64")?).with_context(|| format!("block {}", b.height))?;
        anyhow::ensure!(header.height == b.height && b.file == format!("blocks/{:012}.parquet", b.height), "block {}: the manifest's height or file name is not its header's", b.height);
        headers.push((header, b));
    }
    headers.sort_by_key(|(h, _)| h.first_index);
    // An honest record names the range its own manifest's blocks span.
    let (lo, hi) = (headers.first().map_or(0, |(h, _)| h.first_index), headers.last().map_or(0, |(h, _)| h.tree_size));
    anyhow::ensure!(
        rec.first_index == lo && rec.end_index == hi,
        "{}: the record claims entries {}..{}, the manifest's blocks span {lo}..{hi}",
        rec.manifest,
        rec.first_index,
        rec.end_index
    );
    // Only whole blocks, one after the other from `from`, count.
    let mut covered = from;
    for (header, b) in &headers {
        if header.tree_size <= covered || covered >= end {
            continue;
        }
        if header.first_index > covered {
            break;
        }
        let mine = store.get(crate::store::cf::BLOCKS, &b.height.to_be_bytes())?.with_context(|| format!("block {}: this ledger has no such block", b.height))?;
        anyhow::ensure!(mine == header.encode(), "block {}: the manifest's header is not this ledger's", b.height);
        let file = read(os.as_ref(), &prefix, &b.file).await?;
        anyhow::ensure!(hex::encode(Sha256::digest(&file)) == b.sha256, "{}: its SHA-256 is not the manifest's", b.file);
        // The file's rows are this ledger's own entries, byte for byte, every one of the
        // block: a manifest is only a claim, and so is a file's hash in it.
        rows_are_own_entries(&file, header, store).with_context(|| b.file.clone())?;
        covered = header.tree_size;
    }
    Ok(covered.min(end))
}

/// Checks that a block file holds exactly the block's entries as this ledger stores them.
fn rows_are_own_entries(file: &[u8], header: &BlockHeader, store: &Store) -> anyhow::Result<()> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::UInt64Type;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(file))
        .context("not a Parquet file")?
        .build()
        .context("not a Parquet file")?;
    let mut next = header.first_index;
    for batch in reader {
        let batch = batch.context("reading its rows")?;
        let (Some(idx), Some(raw)) = (
            batch.column_by_name("index").and_then(|c| c.as_primitive_opt::<UInt64Type>()),
            batch.column_by_name("entry").and_then(|c| c.as_binary_opt::<i32>()),
        ) else {
            anyhow::bail!("no index and entry columns");
        };
        for row in 0..batch.num_rows() {
            anyhow::ensure!(idx.value(row) == next && next < header.tree_size, "row {row}: index {} where {next} was expected", idx.value(row));
            anyhow::ensure!(!raw.is_null(row), "index {next}: no entry bytes");
            let mine = store.entry(next)?.with_context(|| format!("index {next}: this ledger has no such entry"))?;
            let same = if custody_proto::entry::is_pruned(&mine) {
                custody_proto::entry::stored_leaf(&mine) == custody_proto::merkle::leaf_hash(raw.value(row))
            } else {
                mine == raw.value(row)
            };
            anyhow::ensure!(same, "index {next}: the archived entry is not this ledger's");
            next += 1;
        }
    }
    anyhow::ensure!(next == header.tree_size, "holds entries up to {next}, the block up to {}", header.tree_size);
    Ok(())
}

/// What the leader may prune next: entries `from..end`, and the export records that claim to
/// hold entry `from` (each is checked against the archive before it counts).
pub struct Candidate {
    /// First entry not pruned yet.
    pub from: u64,
    /// End of the whole blocks sealed before the cutoff, within the recorded exports.
    pub end: u64,
    /// Records whose range holds `from`.
    pub records: Vec<ExportRecord>,
}

/// The next range to prune, if any: below the archive's recorded exported prefix, within
/// whole blocks sealed before `cutoff_ns`, at most `max` entries.
pub fn next_range(store: &Store, archive: &str, cutoff_ns: i64, max: u64) -> anyhow::Result<Option<Candidate>> {
    let done = crate::state::pruned_through(store)?;
    let records = crate::state::export_records(store, archive)?;
    let exported = crate::state::exported_end(&records, done);
    if exported <= done {
        return Ok(None);
    }
    let mut aged = done;
    for r in store.blocks_from(0)? {
        let (_, bytes) = r?;
        let b = BlockHeader::decode(&bytes).map_err(|e| anyhow!("{e}"))?;
        if b.tree_size <= done {
            continue;
        }
        if b.sealed_at_ns > cutoff_ns || b.tree_size > exported {
            break;
        }
        aged = b.tree_size;
    }
    if aged <= done {
        return Ok(None);
    }
    let records: Vec<ExportRecord> = records.into_iter().filter(|r| r.first_index <= done && done < r.end_index).collect();
    Ok(Some(Candidate { from: done, end: aged.min(done + max), records }))
}

/// Normalises an archive or export target name: no trailing `/`, and a `file://` directory by
/// its canonical path when it exists (as `custody export` records it).
pub fn normalize_target(url: &str) -> String {
    let t = url.trim_end_matches('/');
    match t.strip_prefix("file://") {
        Some(p) => match std::fs::canonicalize(p) {
            Ok(c) => format!("file://{}", c.display()),
            Err(_) => t.to_string(),
        },
        None => t.to_string(),
    }
}

/// The leader's retention loop.
pub async fn run(cfg: RetentionConfig, prune_after: Duration, node: NodeHandle, store: StoreCell) {
    let policy = format!("payloads of blocks sealed more than {} ago, once exported to {}", cfg.prune_after, cfg.archive);
    info!(%policy, "retention is on");
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.interval_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_warning = String::new();
    let mut told_none = false;
    let archive = normalize_target(&cfg.archive);
    loop {
        tick.tick().await;
        let st = node.status();
        if st.leader_id != st.id {
            continue;
        }
        let s = store.get();
        let cutoff = crate::node::now_ns().saturating_sub(prune_after.as_nanos().min(i64::MAX as u128) as i64);
        let next = match next_range(&s, &archive, cutoff, cfg.max_entries) {
            Ok(Some(n)) => n,
            Ok(None) => {
                let recorded = crate::state::export_records(&s, &archive).map(|r| r.len()).unwrap_or(0);
                if recorded == 0 && !told_none {
                    info!(%archive, "retention: no export to the archive is recorded yet; nothing is pruned until `custody export` to exactly this target finishes");
                    told_none = true;
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "retention: nothing pruned");
                continue;
            }
        };
        let mut chosen = None;
        for rec in &next.records {
            match check_archive(&archive, rec, &s, next.from, next.end).await {
                // An honest run's range can span blocks an earlier run holds.
                Ok(covered) if covered <= next.from => continue,
                Ok(covered) => {
                    chosen = Some((covered, rec.clone()));
                    break;
                }
                Err(e) => {
                    let msg = format!("{}: {e:#}", rec.manifest);
                    if msg != last_warning {
                        warn!(%archive, manifest = %rec.manifest, error = %format!("{e:#}"), "retention: a recorded export does not hold what it claims; it does not count");
                        last_warning = msg;
                    }
                }
            }
        }
        let Some((end, rec)) = chosen else {
            if !told_none {
                info!(%archive, from = next.from, "retention: no verified export in the archive holds the next entry to prune yet");
                told_none = true;
            }
            continue;
        };
        let from = next.from;
        last_warning.clear();
        told_none = false;
        let ev = custody_proto::Event {
            proxy_id: format!("ledger-{}", st.id),
            session_id: format!("prune-{}", uuid::Uuid::now_v7()),
            seq: 0,
            proxy_time_ns: crate::node::now_ns(),
            kind: EventKind::Prune as i32,
            protocol: Protocol::Unspecified as i32,
            body: Some(event::Body::Prune(Prune { from_index: from, end_index: end, archive: archive.clone(), manifest: rec.manifest.clone(), policy: policy.clone() })),
            ..Default::default()
        };
        match node.prune(from, end, ev.encode_to_vec().into(), Duration::from_secs(5)).await {
            Ok(()) => info!(from, end, manifest = %rec.manifest, "retention: proposed pruning"),
            Err(e) => warn!(error = %e, "retention: could not propose pruning"),
        }
    }
}
