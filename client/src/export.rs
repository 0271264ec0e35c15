//! `custody export`: sealed blocks as Parquet files in a directory or an S3-compatible bucket
//! (through `object_store`), and `custody verify --offline` on such an export.
//!
//! # Layout
//! - `blocks/<height, 12 digits>.parquet`: one file per sealed block, one row per entry. The
//!   columns are the ledger's `events` table (as Flight serves it), then `entry` (the entry's
//!   canonical bytes, the Merkle leaf) and `inclusion_proof` (the RFC 6962 path, list of
//!   32-byte hashes, from the leaf to the root of the manifest's checkpoint). A row pulled out
//!   of the lake on its own can still be proven.
//! - `manifests/<first height>-<last height>.json`: one per export run, written last, after
//!   every file it names was written and read back and verified. A manifest holds the signed
//!   checkpoint (the C2SP note, byte for byte), and per block its header, the consistency
//!   proof from the block's tree to the checkpoint's, its file and the file's SHA-256. It links
//!   to the export run before it by a consistency proof between the two checkpoints.
//!
//! A block file that no manifest names is not part of the export (a run that failed part way);
//! the next run writes it again, and until then `verify --offline` refuses the export.
//!
//! The signed checkpoint covers each block's tree (its root, through the block's consistency
//! proof); a block's other header fields (its seal time) are covered by the next block's
//! `prev_hash`. The newest block of an export has no next block in it, so its seal time is
//! checked only by the ledger (which compares headers byte for byte before retention counts
//! an export), not offline.
//!
//! # What verification checks (offline, from pinned keys only)
//! Each checkpoint's signatures (a majority of the pinned keys, as `custody verify`), each
//! manifest's link to the one before, each block header's link to the one before and its root
//! (a prefix of the checkpoint's tree), and in each file: every row's entry is in the
//! checkpoint's tree at its index, the rows are exactly the block's indices and hash chain, and
//! every other column equals what the entry decodes to, so an edited column names its row.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use arrow::array::{Array, ArrayRef, AsArray, BinaryBuilder, FixedSizeBinaryBuilder, ListBuilder, RecordBatch};
use arrow::datatypes::{Field, Schema, UInt64Type};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use custody_proto::block::BlockHeader;
use custody_proto::entry::{ChainVerifier, Entry};
use custody_proto::merkle::{self, Hash};
use custody_proto::note::{Checkpoint, SignedNote, VerifierKey};
use custody_proto::table::{events_schema, EventsBuilder};
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::audit::{proven_entries, pull_blocks, trusted_checkpoint};
use crate::query::{action, b64_hashes};

/// The manifest's `format`.
pub const EXPORT_FORMAT: &str = "custody-export/1";

/// An export target: a directory, or an S3-compatible bucket and prefix.
pub struct Target {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    /// `file:///abs/dir` or `s3://bucket/prefix`: the name an export is recorded under.
    pub url: String,
}

impl Target {
    /// Opens `spec`: `s3://bucket/prefix` (credentials, region and endpoint from the usual
    /// `AWS_*` variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT`, `AWS_ALLOW_HTTP` for a loopback endpoint), `file:///dir`, or a path.
    /// A directory is created when `create`.
    pub fn open(spec: &str, create: bool) -> anyhow::Result<Self> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            anyhow::ensure!(!bucket.is_empty(), "{spec}: no bucket (expected s3://bucket/prefix)");
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .with_context(|| format!("{spec}: cannot set up the S3 client (check the AWS_* variables)"))?;
            let prefix = prefix.trim_matches('/');
            let url = if prefix.is_empty() { format!("s3://{bucket}") } else { format!("s3://{bucket}/{prefix}") };
            return Ok(Self { store: Arc::new(store), prefix: ObjPath::from(prefix), url });
        }
        if spec.contains("://") && !spec.starts_with("file://") {
            bail!("{spec}: unsupported export target (use a directory, file:///dir or s3://bucket/prefix)");
        }
        let dir = std::path::PathBuf::from(spec.strip_prefix("file://").unwrap_or(spec));
        if create {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the export directory {}", dir.display()))?;
        }
        let dir = dir.canonicalize().with_context(|| format!("export directory {}", dir.display()))?;
        anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir).with_context(|| format!("export directory {}", dir.display()))?;
        Ok(Self { store: Arc::new(store), prefix: ObjPath::default(), url: format!("file://{}", dir.display()) })
    }

    fn path(&self, rel: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in rel.split('/') {
            p = p.join(part);
        }
        p
    }

    async fn put(&self, rel: &str, bytes: Bytes) -> anyhow::Result<()> {
        // object_store's errors carry their causes in their own text; keep one copy of it.
        self.store.put(&self.path(rel), PutPayload::from(bytes)).await.map_err(|e| anyhow!("writing {}/{rel}: {}", self.url, store_error(&e)))?;
        Ok(())
    }

    async fn get(&self, rel: &str) -> anyhow::Result<Bytes> {
        let r = self.store.get(&self.path(rel)).await.map_err(|e| anyhow!("reading {}/{rel}: {}", self.url, store_error(&e)))?;
        r.bytes().await.map_err(|e| anyhow!("reading {}/{rel}: {}", self.url, store_error(&e)))
    }

    /// Names (relative to the target) of the objects under `dir`, sorted.
    async fn list(&self, dir: &str) -> anyhow::Result<Vec<String>> {
        let base = self.path(dir);
        let metas: Vec<object_store::ObjectMeta> = self.store.list(Some(&base)).try_collect().await.map_err(|e| anyhow!("listing {}/{dir}: {}", self.url, store_error(&e)))?;
        let mut out: Vec<String> = metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.as_ref().to_string();
                let strip = if self.prefix.as_ref().is_empty() { full.as_str() } else { full.strip_prefix(self.prefix.as_ref())?.trim_start_matches('/') };
                Some(strip.to_string())
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

/// An object store error in one line: its own text repeats its causes, and an S3 server's
/// XML body follows; keep the first line and the S3 error code.
fn store_error(e: &object_store::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("");
    let first = first.split(": <?xml").next().unwrap_or(first).trim_end_matches([':', ' ']);
    match text.split_once("<Code>").and_then(|(_, r)| r.split_once("</Code>")) {
        Some((code, _)) => format!("{first} ({code})"),
        None => first.to_string(),
    }
}

/// One block in a manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedBlock {
    /// Block height.
    pub height: u64,
    /// First entry index.
    pub first_index: u64,
    /// Entries (rows).
    pub count: u64,
    /// The canonical block header, base64.
    pub header: String,
    /// Consistency proof (base64 hashes) from the block's tree size to the checkpoint's.
    pub root_proof: Vec<String>,
    /// The Parquet file, relative to the target.
    pub file: String,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The link from one export run's checkpoint to the one before.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviousExport {
    /// The earlier manifest, relative to the target.
    pub manifest: String,
    /// Its checkpoint's size.
    pub size: u64,
    /// Consistency proof from that size to this manifest's (base64 hashes).
    pub proof: Vec<String>,
}

/// `manifests/<first>-<last>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// The log's origin (first line of its checkpoints).
    pub origin: String,
    /// The signed checkpoint every row's proof leads to, as the nodes signed it.
    pub checkpoint: String,
    /// Its tree size.
    pub size: u64,
    /// The selection this run was asked for (RFC 3339, on block seal time), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// End of the selection, exclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// When the run finished, RFC 3339.
    pub exported_at: String,
    /// The run before, when the target had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousExport>,
    /// The blocks, by height.
    pub blocks: Vec<ExportedBlock>,
}

impl Manifest {
    fn name(&self) -> String {
        let first = self.blocks.first().map_or(0, |b| b.height);
        let last = self.blocks.last().map_or(0, |b| b.height);
        format!("manifests/{first:012}-{last:012}.json")
    }
}

/// The Parquet file name of block `height`.
pub fn block_file(height: u64) -> String {
    format!("blocks/{height:012}.parquet")
}

/// The rows of one block: the `events` columns, `entry`, `inclusion_proof`.
pub fn block_batch(entries: &[(u64, Vec<u8>, Vec<Hash>)]) -> anyhow::Result<RecordBatch> {
    let mut events = EventsBuilder::new();
    let mut raw = BinaryBuilder::new();
    let mut proofs = ListBuilder::new(FixedSizeBinaryBuilder::new(32)).with_field(Field::new("item", arrow::datatypes::DataType::FixedSizeBinary(32), false));
    for (index, bytes, proof) in entries {
        anyhow::ensure!(
            !custody_proto::entry::is_pruned(bytes),
            "index {index}: its payload was pruned from the ledger by the retention policy (it was exported before); a pruned block cannot be exported again"
        );
        let e = Entry::decode(bytes).map_err(|e| anyhow!("index {index}: {e}"))?;
        let ev = custody_proto::Event::decode(e.event).map_err(|e| anyhow!("index {index}: the entry's event does not decode: {e}"))?;
        events.push(&e, bytes, &ev);
        raw.append_value(bytes);
        for h in proof {
            proofs.values().append_value(h).map_err(|e| anyhow!("{e}"))?;
        }
        proofs.append(true);
    }
    let ev = events.finish();
    let raw: ArrayRef = Arc::new(raw.finish());
    let proofs: ArrayRef = Arc::new(proofs.finish());
    let mut fields: Vec<Field> = ev.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("entry", raw.data_type().clone(), false));
    fields.push(Field::new("inclusion_proof", proofs.data_type().clone(), false));
    let mut cols = ev.columns().to_vec();
    cols.extend([raw, proofs]);
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

fn parquet_bytes(batch: &RecordBatch, meta: Vec<KeyValue>) -> anyhow::Result<Bytes> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(meta))
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))?;
    w.write(batch)?;
    w.close()?;
    Ok(Bytes::from(buf))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn hashes_b64(h: &[Hash]) -> Vec<String> {
    h.iter().map(|h| B64.encode(h)).collect()
}

fn hashes_from_b64(v: &[String], what: &str) -> anyhow::Result<Vec<Hash>> {
    b64_hashes(&json!(v)).with_context(|| what.to_string())
}

/// The manifests at the target, by name, in order.
async fn load_manifests(t: &Target) -> anyhow::Result<Vec<(String, Manifest)>> {
    let mut out = Vec::new();
    for name in t.list("manifests").await? {
        // Only manifests/<name>.json: an export written into a subdirectory is another export.
        if !name.ends_with(".json") || name.matches('/').count() != 1 {
            continue;
        }
        let bytes = t.get(&name).await?;
        let m: Manifest = serde_json::from_slice(&bytes).with_context(|| format!("{}/{name} is not an export manifest", t.url))?;
        anyhow::ensure!(m.format == EXPORT_FORMAT, "{}/{name}: format {:?}, expected {EXPORT_FORMAT}", t.url, m.format);
        out.push((name, m));
    }
    chain_order(out, &t.url)
}

/// Manifests in the order they were written: the first run links to nothing, each later one
/// to the run before it. A manifest whose predecessor is missing, or two that claim the same
/// place, mean the export was changed.
fn chain_order(mut all: Vec<(String, Manifest)>, url: &str) -> anyhow::Result<Vec<(String, Manifest)>> {
    let mut out: Vec<(String, Manifest)> = Vec::with_capacity(all.len());
    let mut prev: Option<String> = None;
    while !all.is_empty() {
        let next: Vec<usize> = all.iter().enumerate().filter(|(_, (_, m))| m.previous.as_ref().map(|p| &p.manifest) == prev.as_ref()).map(|(i, _)| i).collect();
        match next.as_slice() {
            [i] => {
                let m = all.remove(*i);
                prev = Some(m.0.clone());
                out.push(m);
            }
            [] => {
                let (name, m) = &all[0];
                return Err(match (&prev, &m.previous) {
                    (_, Some(p)) if !out.iter().any(|(n, _)| *n == p.manifest) => anyhow!("{url}/{name}: the export before it, {}, is missing (manifests were removed)", p.manifest),
                    _ => anyhow!("{url}/{name}: does not link into the chain of exports (its previous export is not the last one before it)"),
                });
            }
            many => bail!("{url}: {} and {} both claim to follow {}", all[many[0]].0, all[many[1]].0, prev.as_deref().unwrap_or("nothing (the first export)")),
        }
    }
    Ok(out)
}

/// What a run exported: for the ledger's record and the command's report.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    /// The target's URL.
    pub target: String,
    /// The manifest written, relative to the target.
    pub manifest: String,
    /// Its SHA-256, hex.
    pub manifest_sha256: String,
    /// The checkpoint size the rows are proven in.
    pub size: u64,
    /// Heights `first..=last`.
    pub first_height: u64,
    /// Last height.
    pub last_height: u64,
    /// Entries `first_index..end_index`.
    pub first_index: u64,
    /// End of the entries, exclusive.
    pub end_index: u64,
    /// Rows written.
    pub rows: u64,
}

/// `custody export`: every sealed block selected by `since`/`until` (on seal time) that the
/// target does not hold yet, as Parquet, then the manifest. Nothing is in the export until its
/// manifest is written, and the manifest is written only after every file was read back from
/// the target and verified.
pub async fn export(url: &str, spec: &str, since: Option<&str>, until: Option<&str>, keys: &[String]) -> anyhow::Result<Option<ExportSummary>> {
    anyhow::ensure!(!keys.is_empty(), "export needs pinned ledger keys (--key, or ledger_keys in the config): the export is proven against a checkpoint they signed");
    let since_ns = since.map(|s| crate::query::time_arg(s).and_then(|t| rfc3339_ns(&t))).transpose()?;
    let until_ns = until.map(|s| crate::query::time_arg(s).and_then(|t| rfc3339_ns(&t))).transpose()?;
    if let (Some(s), Some(u)) = (since_ns, until_ns) {
        anyhow::ensure!(s < u, "--since must be before --until");
    }
    let target = Target::open(spec, true)?;
    let existing = load_manifests(&target).await.map_err(|e| anyhow!("{e:#}; nothing was marked as exported"))?;
    let have: std::collections::HashSet<u64> = existing.iter().flat_map(|(_, m)| m.blocks.iter().map(|b| b.height)).collect();
    let trusted = trusted_checkpoint(url, None, keys).await?;
    let cp = &trusted.cp;
    if let Some((_, m)) = existing.last() {
        anyhow::ensure!(m.origin == cp.origin, "{} holds an export of another log ({}), not {}", target.url, m.origin, cp.origin);
    }
    let all = pull_blocks(url).await?;
    // Blocks the ledger's retention already pruned hold no payloads to export (they are in its
    // archive); they are left out, and said so.
    let pruned = action(url, "status", &json!({})).await?["pruned_through"].as_u64().unwrap_or(0);
    let gone: Vec<u64> = all.iter().filter(|b| b.first_index < pruned && !have.contains(&b.height)).map(|b| b.height).collect();
    if let (Some(first), Some(last)) = (gone.first(), gone.last()) {
        eprintln!("custody: note: blocks {first}..={last} were pruned from the ledger by its retention policy (their payloads are in its archive) and are not exported here");
    }
    let selected: Vec<&BlockHeader> = all
        .iter()
        .filter(|b| b.first_index >= pruned)
        .filter(|b| b.tree_size <= cp.size && !have.contains(&b.height))
        .filter(|b| since_ns.is_none_or(|s| b.sealed_at_ns >= s) && until_ns.is_none_or(|u| b.sealed_at_ns < u))
        .collect();
    if selected.is_empty() {
        println!("nothing to export: {} already holds every sealed block selected (checkpoint at size {})", target.url, cp.size);
        return Ok(None);
    }
    let mut blocks = Vec::with_capacity(selected.len());
    let mut rows = 0u64;
    for b in &selected {
        let indices: Vec<u64> = (b.first_index..b.tree_size).collect();
        let entries = proven_entries(url, &indices, cp).await?;
        let batch = block_batch(&entries)?;
        let root_proof = if b.tree_size == cp.size {
            Vec::new()
        } else {
            let p = action(url, "consistency_proof", &json!({"first": b.tree_size, "second": cp.size})).await?;
            b64_hashes(&p["proof"])?
        };
        merkle::verify_consistency(b.tree_size, cp.size, &b.root, &cp.root, &root_proof)
            .map_err(|e| anyhow!("block {}: its root is not a prefix of the signed checkpoint's tree: {e}", b.height))?;
        let meta = vec![
            KeyValue::new("custody.origin".into(), cp.origin.clone()),
            KeyValue::new("custody.block_height".into(), b.height.to_string()),
            KeyValue::new("custody.checkpoint_size".into(), cp.size.to_string()),
        ];
        let bytes = parquet_bytes(&batch, meta)?;
        let file = block_file(b.height);
        target.put(&file, bytes.clone()).await.map_err(|e| anyhow!("{e:#}; the export stopped at block {} and nothing was marked as exported (no manifest was written)", b.height))?;
        rows += entries.len() as u64;
        blocks.push(ExportedBlock {
            height: b.height,
            first_index: b.first_index,
            count: b.count,
            header: B64.encode(b.encode()),
            root_proof: hashes_b64(&root_proof),
            file,
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        });
    }
    let previous = match existing.last() {
        Some((name, m)) if m.size <= cp.size => {
            let proof = if m.size == cp.size {
                Vec::new()
            } else {
                let p = action(url, "consistency_proof", &json!({"first": m.size, "second": cp.size})).await?;
                b64_hashes(&p["proof"])?
            };
            Some(PreviousExport { manifest: name.clone(), size: m.size, proof: hashes_b64(&proof) })
        }
        Some((name, m)) => bail!("{}/{name} was exported at a larger checkpoint ({}) than the ledger's signed one ({}); is this the same ledger?", target.url, m.size, cp.size),
        None => None,
    };
    let manifest = Manifest {
        format: EXPORT_FORMAT.into(),
        origin: cp.origin.clone(),
        checkpoint: trusted.note.clone(),
        size: cp.size,
        since: since.map(crate::query::time_arg).transpose()?,
        until: until.map(crate::query::time_arg).transpose()?,
        exported_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        previous,
        blocks,
    };
    // Read back what the target holds and verify it as an auditor would, before the manifest
    // makes it part of the export.
    let pinned = parse_keys(keys)?;
    let mut report = Report::default();
    let prev_manifest = existing.last().map(|(_, m)| m);
    check_manifest(&target, &manifest, prev_manifest, &pinned, &mut report)
        .await
        .map_err(|e| anyhow!("{e:#}; the files read back from {} do not verify, so nothing was marked as exported (no manifest was written)", target.url))?;
    let name = manifest.name();
    let text = serde_json::to_vec_pretty(&manifest)?;
    target.put(&name, Bytes::from(text.clone())).await.map_err(|e| anyhow!("{e:#}; nothing was marked as exported"))?;
    let (first, last) = (&manifest.blocks[0], &manifest.blocks[manifest.blocks.len() - 1]);
    let summary = ExportSummary {
        target: target.url.clone(),
        manifest: name,
        manifest_sha256: sha256_hex(&text),
        size: cp.size,
        first_height: first.height,
        last_height: last.height,
        first_index: first.first_index,
        end_index: last.first_index + last.count,
        rows,
    };
    println!(
        "exported blocks {}..={} (entries {}..{}, {rows} rows) to {}; read back and verified against the checkpoint at size {}; manifest {}",
        summary.first_height, summary.last_height, summary.first_index, summary.end_index, summary.target, cp.size, summary.manifest
    );
    // The ledger's record of it: what retention counts (for its configured archive only).
    let recorded = action(url, "record_export", &serde_json::to_value(&summary)?).await.map_err(|e| {
        anyhow!("{e:#}: the export at {} is complete and verified, but the ledger did not record it, so retention does not count it yet", summary.target)
    })?;
    println!("recorded in the ledger at index {}", recorded["index"]);
    Ok(Some(summary))
}

fn rfc3339_ns(t: &str) -> anyhow::Result<i64> {
    chrono::DateTime::parse_from_rfc3339(t)?.timestamp_nanos_opt().context("time out of range")
}

fn parse_keys(keys: &[String]) -> anyhow::Result<Vec<VerifierKey>> {
    keys.iter().map(|k| VerifierKey::parse(k).with_context(|| format!("--key {k}"))).collect()
}

/// Counts for the verification report.
#[derive(Debug, Default)]
struct Report {
    manifests: u64,
    blocks: u64,
    rows: u64,
    signers: Vec<String>,
    heights: std::collections::BTreeSet<u64>,
    headers: BTreeMap<u64, BlockHeader>,
}

/// Verifies one manifest and every file it names. `prev` is the manifest before it.
async fn check_manifest(t: &Target, m: &Manifest, prev: Option<&Manifest>, pinned: &[VerifierKey], report: &mut Report) -> anyhow::Result<()> {
    let note = SignedNote::parse(&m.checkpoint).context("the manifest's checkpoint is not a signed note")?;
    let signers = note.verify(pinned).context("no pinned key signed the manifest's checkpoint")?;
    crate::query::check_quorum(&note, &signers, pinned)?;
    let cp = Checkpoint::parse(&note.text)?;
    anyhow::ensure!(cp.origin == m.origin && cp.size == m.size, "the manifest's origin and size are not its checkpoint's");
    if let Some(p) = prev {
        anyhow::ensure!(p.origin == m.origin, "the manifest is for {}, the one before it for {}", m.origin, p.origin);
        let link = m.previous.as_ref().context("the manifest does not link to the export before it")?;
        anyhow::ensure!(link.size == p.size, "the manifest links to size {}, the export before it is at size {}", link.size, p.size);
        let pcp = Checkpoint::parse(&SignedNote::parse(&p.checkpoint)?.text)?;
        let proof = hashes_from_b64(&link.proof, "the link to the export before")?;
        merkle::verify_consistency(pcp.size, cp.size, &pcp.root, &cp.root, &proof)
            .map_err(|e| anyhow!("HISTORY REWRITTEN: the checkpoint at size {} does not extend the earlier export's at size {}: {e}", cp.size, pcp.size))?;
    }
    anyhow::ensure!(!m.blocks.is_empty(), "the manifest names no blocks");
    anyhow::ensure!(m.blocks.windows(2).all(|w| w[0].height < w[1].height), "the manifest's blocks are not in height order");
    for b in &m.blocks {
        let what = format!("block {} ({})", b.height, b.file);
        anyhow::ensure!(!report.heights.contains(&b.height), "{what}: already in an earlier manifest");
        let header = BlockHeader::decode(&B64.decode(&b.header).with_context(|| format!("{what}: header is not base64"))?).with_context(|| what.clone())?;
        anyhow::ensure!(
            header.height == b.height && header.first_index == b.first_index && header.count == b.count && b.file == block_file(b.height),
            "{what}: the manifest's height, range or file name disagree with the block header"
        );
        // Each block links to the one before it when the export holds that one too (a
        // --since run can leave gaps; each block still proves itself against the checkpoint).
        if header.height == 0 {
            header.check_follows(None).map_err(|e| anyhow!("{what}: {e}"))?;
        } else if let Some(p) = report.headers.get(&(header.height - 1)) {
            header.check_follows(Some(p)).map_err(|e| anyhow!("{what}: {e}"))?;
        }
        if let Some(n) = report.headers.get(&(header.height + 1)) {
            n.check_follows(Some(&header)).map_err(|e| anyhow!("block {}: {e}", n.height))?;
        }
        anyhow::ensure!(header.tree_size <= cp.size, "{what}: goes beyond the checkpoint's {} entries", cp.size);
        let proof = hashes_from_b64(&b.root_proof, &what)?;
        merkle::verify_consistency(header.tree_size, cp.size, &header.root, &cp.root, &proof)
            .map_err(|e| anyhow!("{what}: its root is not a prefix of the signed checkpoint's tree: {e}"))?;
        let bytes = t.get(&b.file).await?;
        // Rows first: a changed row is named by its index and column.
        report.rows += check_block_file(&bytes, &header, &cp).map_err(|e| anyhow!("{}: {e:#}", b.file))?;
        anyhow::ensure!(bytes.len() as u64 == b.bytes, "{}: {} bytes, the manifest says {} (the file was changed after export, though every row still verifies)", b.file, bytes.len(), b.bytes);
        anyhow::ensure!(
            sha256_hex(&bytes) == b.sha256,
            "{}: its SHA-256 is not the manifest's (the file was changed after export, though every row still verifies)",
            b.file
        );
        report.blocks += 1;
        report.heights.insert(header.height);
        report.headers.insert(header.height, header);
    }
    report.manifests += 1;
    for s in signers {
        if !report.signers.contains(&s) {
            report.signers.push(s);
        }
    }
    Ok(())
}

/// Verifies one block file's rows against its header and the checkpoint; returns the rows.
pub fn check_block_file(bytes: &Bytes, header: &BlockHeader, cp: &Checkpoint) -> anyhow::Result<u64> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).context("not a Parquet file")?.build().context("not a Parquet file")?;
    let mut entries: Vec<(u64, Vec<u8>, Vec<Hash>)> = Vec::new();
    let mut batches = Vec::new();
    for b in reader {
        let b = b.context("reading the Parquet rows")?;
        let (Some(idx), Some(raw), Some(proofs)) = (
            b.column_by_name("index").and_then(|c| c.as_primitive_opt::<UInt64Type>()),
            b.column_by_name("entry").and_then(|c| c.as_binary_opt::<i32>()),
            b.column_by_name("inclusion_proof").and_then(|c| c.as_list_opt::<i32>()),
        ) else {
            bail!("the file lacks the index (u64), entry (binary) or inclusion_proof (list) columns");
        };
        for row in 0..b.num_rows() {
            let index = idx.value(row);
            anyhow::ensure!(!raw.is_null(row) && !proofs.is_null(row), "index {index}: entry or inclusion_proof is null");
            let p = proofs.value(row);
            let p = p.as_fixed_size_binary_opt().with_context(|| format!("index {index}: inclusion_proof is not a list of 32-byte hashes"))?;
            let mut proof = Vec::with_capacity(p.len());
            for i in 0..p.len() {
                proof.push(p.value(i).try_into().with_context(|| format!("index {index}: a proof hash is not 32 bytes"))?);
            }
            entries.push((index, raw.value(row).to_vec(), proof));
        }
        batches.push(b);
    }
    // The rows are exactly the block's entries, in order.
    for (pos, (index, _, _)) in entries.iter().enumerate() {
        let want = header.first_index + pos as u64;
        anyhow::ensure!(*index == want, "index {want}: row {pos} holds index {index} instead; rows were removed, added or reordered");
    }
    anyhow::ensure!(
        entries.len() as u64 == header.count,
        "index {}: the block holds {} entries, the file {} rows; rows were removed or added",
        header.first_index + entries.len().min(header.count as usize) as u64,
        header.count,
        entries.len()
    );
    for (index, bytes, proof) in &entries {
        merkle::verify_inclusion(*index, cp.size, &merkle::leaf_hash(bytes), proof, &cp.root)
            .map_err(|e| anyhow!("index {index}: the row's entry is not in the signed checkpoint (size {}): {e}; the entry bytes were changed", cp.size))?;
    }
    if let Some((i, first, _)) = entries.first() {
        let e = Entry::decode(first).map_err(|e| anyhow!("index {i}: {e}"))?;
        let mut chain = ChainVerifier::resume(*i, e.prev_hash);
        for (_, bytes, _) in &entries {
            chain.push(bytes).map_err(|e| anyhow!("{e}"))?;
        }
    }
    // Every other column is what the entry says.
    let want = block_batch(&entries)?;
    let names: Vec<String> = events_schema().fields().iter().map(|f| f.name().clone()).collect();
    let mut offset = 0usize;
    for b in &batches {
        for name in &names {
            let got = b.column_by_name(name).with_context(|| format!("the file has no {name} column"))?;
            let exp = want.column_by_name(name).context("events schema")?.slice(offset, b.num_rows());
            // Another writer (pyarrow rewriting a file) may name list items differently; the
            // values are what must match.
            let got = if got.data_type() == exp.data_type() {
                got.clone()
            } else {
                arrow::compute::cast(got, exp.data_type()).with_context(|| format!("column {name} has type {}, not {}", got.data_type(), exp.data_type()))?
            };
            if got.as_ref() != exp.as_ref() {
                let row = (0..b.num_rows()).find(|r| got.slice(*r, 1).as_ref() != exp.slice(*r, 1).as_ref()).unwrap_or(0);
                bail!("index {}: column {name} is not what the row's entry records (the row was edited after export)", header.first_index + (offset + row) as u64);
            }
        }
        offset += b.num_rows();
    }
    Ok(entries.len() as u64)
}

/// True when `spec` holds an export (a `manifests/` prefix) rather than a `custody bundle`.
pub fn is_export(spec: &str) -> bool {
    spec.starts_with("s3://") || std::path::Path::new(spec.strip_prefix("file://").unwrap_or(spec)).join("manifests").is_dir()
}

/// `custody verify --offline` on an export.
pub async fn verify_export(spec: &str, keys: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(!keys.is_empty(), "offline verification needs pinned ledger keys (--key, or ledger_keys in the config): an export's own keys prove nothing");
    let pinned = parse_keys(keys)?;
    let t = Target::open(spec, false)?;
    let manifests = load_manifests(&t).await?;
    anyhow::ensure!(!manifests.is_empty(), "{} holds no export manifests (manifests/*.json)", t.url);
    let mut report = Report::default();
    let mut prev: Option<&Manifest> = None;
    let mut named: BTreeMap<String, ()> = BTreeMap::new();
    for (name, m) in &manifests {
        check_manifest(&t, m, prev, &pinned, &mut report).await.map_err(|e| anyhow!("{name}: {e:#}"))?;
        for b in &m.blocks {
            named.insert(b.file.clone(), ());
        }
        prev = Some(m);
    }
    let stray: Vec<String> = t.list("blocks").await?.into_iter().filter(|f| f.matches('/').count() == 1 && !named.contains_key(f)).collect();
    // The blocks of all runs together are one run of heights: a gap inside it is a block
    // removed with its manifest entry. (The oldest or newest runs removed whole cannot be
    // told from an export that never had them: compare with the ledger's `export` events.)
    let mut expected = report.heights.iter().next().copied();
    for h in &report.heights {
        if let Some(e) = expected {
            anyhow::ensure!(*h == e, "{}: block {e} is missing (the export holds blocks before and after it); a block and its manifest entry were removed", t.url);
        }
        expected = Some(h + 1);
    }
    if !stray.is_empty() {
        bail!(
            "{}: {} block files are named by no manifest ({}): an export that did not finish (run custody export again to complete it), or a manifest that lost them",
            t.url,
            stray.len(),
            stray.join(", ")
        );
    }
    let last = manifests.last().map(|(_, m)| m.size).unwrap_or(0);
    println!("ok: checkpoints signed by {} (the last at size {last})", report.signers.join(", "));
    println!("ok: export at {} verified offline: {} manifests, {} blocks, {} rows; every row's entry proven, every column matches its entry", t.url, report.manifests, report.blocks, report.rows);
    Ok(())
}
