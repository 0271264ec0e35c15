//! Fuzz bodies: one function per decoder that reads bytes from the network or from disk.
//! Each takes arbitrary bytes and must return without panicking, whatever they are.
//!
//! They are driven two ways: by libFuzzer through `cargo fuzz` (see `libfuzzer/`), and on
//! stable Rust by `tests/seeded.rs`, which mutates valid messages with a fixed seed so that
//! the ordinary test run covers them too.

use bytes::BytesMut;
use custody_proto::pb::v1::{StreamAccept, StreamOpen};
use custody_proto::pg::{decode_frame, decode_startup, Backend, ErrorFields, Frontend, Side};
use custody_proxy::pg::session::SessionTracker;

/// The largest message the bodies accept; small, so that the fuzzer explores the limits.
const MAX_MESSAGE: usize = 64 * 1024;

/// The proxy's caller side: a startup packet, then frontend frames, each parsed.
pub fn pg_frontend(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    match decode_startup(&mut buf) {
        Ok(Some(s)) => {
            let _ = s.param("database");
        }
        Ok(None) => return,
        Err(_) => {
            // Not a startup packet: try the bytes as frames anyway.
            buf = BytesMut::from(data);
        }
    }
    while let Ok(Some(frame)) = decode_frame(&mut buf, Side::Frontend, MAX_MESSAGE) {
        assert!(frame.raw.len() <= MAX_MESSAGE + 5, "frame larger than the limit");
        let _ = Frontend::parse(&frame);
    }
}

/// The proxy's target side: backend frames, each parsed, rows and error fields walked.
pub fn pg_backend(data: &[u8]) {
    let _ = custody_proto::pg::streamable_backend_frame(data, 1024);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode_frame(&mut buf, Side::Backend, MAX_MESSAGE) {
        match Backend::parse(&frame) {
            Ok(Backend::DataRow(row)) => {
                let _ = row.cells().map(|c| c.map_or(0, <[u8]>::len)).sum::<usize>();
            }
            Ok(Backend::ErrorResponse(f) | Backend::NoticeResponse(f)) => walk_fields(&f),
            _ => {}
        }
    }
}

fn walk_fields(f: &ErrorFields<'_>) {
    for code in [b'S', b'C', b'M', b'D', b'H'] {
        let _ = f.get(code);
    }
}

/// The session tracker fed a conversation: the first byte of each chunk says which side
/// sent it. The tracker must reject a conversation the server could not have had with an
/// error, never a panic.
pub fn pg_session(data: &[u8]) {
    let mut t = SessionTracker::new(256);
    let mut seq = 0u64;
    let mut fe = BytesMut::new();
    let mut be = BytesMut::new();
    for chunk in data.split(|b| *b == 0xff) {
        let Some((&side, rest)) = chunk.split_first() else { continue };
        if side & 1 == 0 {
            fe.extend_from_slice(rest);
            while let Ok(Some(frame)) = decode_frame(&mut fe, Side::Frontend, MAX_MESSAGE) {
                if let Ok(msg) = Frontend::parse(&frame) {
                    let _ = t.on_request(&msg, &mut || {
                        seq += 1;
                        seq
                    });
                }
            }
        } else {
            be.extend_from_slice(rest);
            while let Ok(Some(frame)) = decode_frame(&mut be, Side::Backend, MAX_MESSAGE) {
                if let Ok(msg) = Backend::parse(&frame) {
                    let _ = t.on_response(&msg, frame.raw.len());
                }
            }
        }
    }
    let _ = t.flush_copy();
}

/// The first frame of a tunnel stream, both directions.
pub fn tunnel(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let _ = custody_proto::tunnel::decode::<StreamOpen>(&mut BytesMut::from(data));
    let _ = custody_proto::tunnel::decode::<StreamAccept>(&mut BytesMut::from(data));
}

/// Ledger entries as read back from disk or from an export: decode, then chain.
pub fn entry(data: &[u8]) {
    let _ = custody_proto::entry::Entry::decode(data);
    // A pruned entry (retention) must round-trip exactly when it decodes.
    if let Ok(p) = custody_proto::entry::PrunedEntry::decode(data) {
        assert_eq!(p.encode(), data, "a decoded pruned entry must re-encode to the same bytes");
    }
    let _ = custody_proto::entry::stored_leaf(data);
    let mut chain = custody_proto::entry::ChainVerifier::new();
    for part in data.split(|b| *b == 0xff) {
        if chain.push(part).is_err() {
            break;
        }
    }
}

/// What an independent verifier reads: a signed note, its checkpoint body, a verifier key,
/// and proof hashes; each parsed and checked, never trusted.
pub fn note(data: &[u8]) {
    use custody_proto::merkle;
    use custody_proto::note::{Checkpoint, SignedNote, VerifierKey};
    let Ok(input) = std::str::from_utf8(data) else { return };
    // Verifier keys, one per line, then NUL, then the note.
    let (keys, text) = input.split_once('\0').unwrap_or(("", input));
    let keys: Vec<VerifierKey> = keys.lines().filter_map(|l| VerifierKey::parse(l).ok()).collect();
    if let Ok(n) = SignedNote::parse(text) {
        let _ = n.verify(&keys);
        let _ = n.encode();
        if let Ok(cp) = Checkpoint::parse(&n.text) {
            // Proof hashes taken from the input, checked against the checkpoint.
            let hashes: Vec<merkle::Hash> = data.chunks_exact(32).take(70).map(|c| c.try_into().unwrap_or([0; 32])).collect();
            let index = data.first().copied().unwrap_or(0) as u64;
            let _ = merkle::verify_inclusion(index, cp.size, &merkle::leaf_hash(data), &hashes, &cp.root);
            let _ = merkle::verify_consistency(index, cp.size, &hashes.first().copied().unwrap_or([0; 32]), &cp.root, &hashes);
        }
    }
    let _ = Checkpoint::parse(text);
}

/// Block headers as an export bundle or a peer's `blocks` answer carries them: decode each
/// 120-byte header, and check each follows the one before.
pub fn block(data: &[u8]) {
    use custody_proto::block::{BlockHeader, HEADER_LEN};
    let _ = BlockHeader::decode(data);
    let mut prev: Option<BlockHeader> = None;
    for chunk in data.chunks(HEADER_LEN) {
        let Ok(b) = BlockHeader::decode(chunk) else { break };
        let _ = b.check_follows(prev.as_ref());
        let _ = BlockHeader::next(Some(&b), b.tree_size.wrapping_add(1), b.root, b.sealed_at_ns);
        prev = Some(b);
    }
}
