//! Reads the ledger for a [`TicketQuery`], producing Arrow record batches.
//!
//! Index use: a `session_id` filter walks the `by_session` index; a time range is turned into
//! an index range by binary search over entries (commit times never decrease with the index).
//! The remaining filters apply to decoded events.

use arrow::array::RecordBatch;
use custody_proto::entry::{Entry, PrunedEntry};
use thiserror::Error;

use crate::state::{by_field_prefix, by_session_key, Field, Lookup};
use crate::store::{cf, Store, StoreError};
use crate::table::{decode_event, entries_batch, sessions_batch, EventsBuilder, Table, TicketQuery};

/// A scan failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ScanError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This node's self-check found its log damaged from `from_index`; rows from there are
    /// not served.
    #[error("{0}; read from another ledger node")]
    Damaged(crate::selfcheck::Damage),
    /// A stored entry could not be decoded: the range is damaged and is not served.
    #[error("entry {index} is corrupt and is not served: {reason}")]
    Corrupt {
        /// Index.
        index: u64,
        /// Why.
        reason: String,
    },
}

/// Rows per record batch.
pub const BATCH_ROWS: usize = 8192;

fn commit_time(store: &Store, index: u64) -> Result<i64, ScanError> {
    let bytes = store.entry(index)?.ok_or_else(|| ScanError::Corrupt {
        index,
        reason: "missing".into(),
    })?;
    if custody_proto::entry::is_pruned(&bytes) {
        let p = PrunedEntry::decode(&bytes).map_err(|e| ScanError::Corrupt { index, reason: e.to_string() })?;
        return Ok(p.commit_time_ns);
    }
    let e = Entry::decode(&bytes).map_err(|e| ScanError::Corrupt {
        index,
        reason: e.to_string(),
    })?;
    Ok(e.commit_time_ns)
}

/// First index in `[lo, hi)` whose commit time is `>= t` (or `hi`).
fn lower_bound(store: &Store, mut lo: u64, mut hi: u64, t: i64) -> Result<u64, ScanError> {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if commit_time(store, mid)? < t {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Runs `q` against `store`, whose committed size is `size`, handing each batch to `sink`.
/// `sink` returns false to stop early (the reader went away). With `damage`, rows from its
/// index on are refused (and session summaries, which rest on every entry, entirely).
pub fn scan(
    store: &Store,
    size: u64,
    q: &TicketQuery,
    damage: Option<&crate::selfcheck::Damage>,
    mut sink: impl FnMut(RecordBatch) -> bool,
) -> Result<(), ScanError> {
    let limit = q.limit.unwrap_or(u64::MAX);
    let damaged_from = damage.map_or(u64::MAX, |d| d.from_index);
    match q.table {
        Table::Sessions => {
            if let Some(d) = damage {
                return Err(ScanError::Damaged(d.clone()));
            }
            let mut rows = Vec::new();
            let mut n = 0u64;
            for v in store.values(cf::SESSIONS)? {
                let v = v?;
                let s: crate::state::SessionSummary = serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt(format!("session summary: {e}")))?;
                if !q.matches_session(&s) {
                    continue;
                }
                rows.push(s);
                n += 1;
                if rows.len() >= BATCH_ROWS {
                    if !sink(sessions_batch(&rows)) {
                        return Ok(());
                    }
                    rows.clear();
                }
                if n >= limit {
                    break;
                }
            }
            if !rows.is_empty() {
                sink(sessions_batch(&rows));
            }
            Ok(())
        }
        Table::Entries | Table::Events => {
            let (since, until) = q.time_range().map_err(|e| StoreError::Corrupt(e))?;
            let mut lo = q.from_index.unwrap_or(0).min(size);
            let mut hi = size;
            if since != i64::MIN {
                lo = lower_bound(store, lo, hi, since)?;
            }
            if until != i64::MAX {
                hi = lower_bound(store, lo, hi, until)?;
            }
            // The most selective index the query names: a session, else a caller, a
            // resource or a kind; a bare time or index range walks the entries themselves.
            let field_prefix = match (&q.session_id, &q.identity, &q.resource, &q.kind) {
                (Some(sid), ..) => Some((cf::BY_SESSION, {
                    let mut p = by_session_key(sid, 0);
                    p.truncate(p.len() - 8);
                    p
                })),
                (None, Some(id), ..) => Some((cf::BY_FIELD, by_field_prefix(Field::Identity, id))),
                (None, None, Some(r), _) => Some((cf::BY_FIELD, by_field_prefix(Field::Resource, r))),
                (None, None, None, Some(k)) => Some((cf::BY_FIELD, by_field_prefix(Field::Kind, k))),
                _ => None,
            };
            let indices: Box<dyn Iterator<Item = Result<(u64, Vec<u8>), ScanError>>> =
                match field_prefix {
                    Some((index_cf, prefix)) => {
                        let keys: Vec<u64> = store
                            .keys_with_prefix(index_cf, &prefix)?
                            .filter_map(|k| match k {
                                Ok(k) => {
                                    let tail = &k[prefix.len()..];
                                    let a: [u8; 8] = tail.try_into().ok()?;
                                    Some(Ok(u64::from_be_bytes(a)))
                                }
                                Err(e) => Some(Err(e)),
                            })
                            .collect::<Result<_, _>>()?;
                        Box::new(keys.into_iter().filter(move |i| *i >= lo && *i < hi).map(
                            move |i| {
                                let b = store.entry(i)?.ok_or_else(|| ScanError::Corrupt {
                                    index: i,
                                    reason: "indexed entry is missing".into(),
                                })?;
                                Ok((i, b))
                            },
                        ))
                    }
                    None => Box::new(
                        store
                            .entries_from(lo)?
                            .take_while(move |r| r.as_ref().map(|(i, _)| *i < hi).unwrap_or(true))
                            .map(|r| r.map_err(ScanError::from)),
                    ),
                };
            let indices = indices.map(|r| match (r, damage) {
                (Ok((i, _)), Some(d)) if i >= damaged_from => Err(ScanError::Damaged(d.clone())),
                (other, _) => other,
            });
            let mut n = 0u64;
            if q.table == Table::Entries {
                let mut rows = Vec::new();
                for r in indices {
                    rows.push(r?);
                    n += 1;
                    if rows.len() >= BATCH_ROWS {
                        if !sink(entries_batch(&rows)) {
                            return Ok(());
                        }
                        rows.clear();
                    }
                    if n >= limit {
                        break;
                    }
                }
                refuse_if_short(damage, n, limit, hi)?;
                if !rows.is_empty() {
                    sink(entries_batch(&rows));
                }
                return Ok(());
            }
            let mut b = EventsBuilder::new();
            for r in indices {
                let (index, bytes) = r?;
                if custody_proto::entry::is_pruned(&bytes) {
                    // Retention removed the payload: the row keeps its index, time, session,
                    // kind and hash, and says `pruned`. Filters on what is gone do not match.
                    let p = PrunedEntry::decode(&bytes).map_err(|e| ScanError::Corrupt { index, reason: e.to_string() })?;
                    let ev = custody_proto::Event { session_id: p.session_id.clone(), kind: p.kind, ..Default::default() };
                    if p.index != index || !q.matches(&ev) {
                        continue;
                    }
                    b.push_pruned(&p);
                    n += 1;
                    if b.len() >= BATCH_ROWS && !sink(b.finish()) {
                        return Ok(());
                    }
                    if n >= limit {
                        break;
                    }
                    continue;
                }
                let entry = Entry::decode(&bytes).map_err(|e| ScanError::Corrupt {
                    index,
                    reason: e.to_string(),
                })?;
                if entry.index != index {
                    return Err(ScanError::Corrupt {
                        index,
                        reason: format!("entry claims index {}", entry.index),
                    });
                }
                let ev = decode_event(&entry).map_err(|e| ScanError::Corrupt {
                    index,
                    reason: e.to_string(),
                })?;
                if !q.matches(&ev) {
                    continue;
                }
                b.push(&entry, &bytes, &ev);
                n += 1;
                if b.len() >= BATCH_ROWS && !sink(b.finish()) {
                    return Ok(());
                }
                if n >= limit {
                    break;
                }
            }
            refuse_if_short(damage, n, limit, hi)?;
            if !b.is_empty() {
                sink(b.finish());
            }
            Ok(())
        }
    }
}

/// A scan that ran out of entries (rather than reaching its limit) before its range's end `hi`
/// would end at the damaged range silently, with entries the node lost left out: refuse it.
fn refuse_if_short(damage: Option<&crate::selfcheck::Damage>, n: u64, limit: u64, hi: u64) -> Result<(), ScanError> {
    match damage {
        Some(d) if n < limit && hi >= d.from_index => Err(ScanError::Damaged(d.clone())),
        _ => Ok(()),
    }
}

/// Silences an unused-import lint when Lookup is only needed for its impl.
#[allow(dead_code)]
fn _uses(_: &dyn Lookup) {}
