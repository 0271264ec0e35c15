//! Runs every fuzz body over valid messages mutated with a fixed seed, on stable Rust, so
//! that `cargo test` checks the decoders never panic on network input. `cargo fuzz` (see
//! `libfuzzer/`) explores far more; this keeps the ordinary test run honest.

use custody_proto::pg;

/// xorshift64*: deterministic, no dependency, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(s.as_bytes());
    v.push(0);
}

fn frontend_seed() -> Vec<u8> {
    let mut out = pg::startup_message(&[("user", "alice"), ("database", "db")]).to_vec();
    let mut p = Vec::new();
    cstr(&mut p, "s1");
    cstr(&mut p, "select $1::int, $2::text");
    p.extend_from_slice(&[0, 2, 0, 0, 0, 23, 0, 0, 0, 25]);
    out.extend(msg(b'P', &p));
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, "s1");
    b.extend_from_slice(&[0, 2, 0, 1, 0, 0, 0, 2]);
    b.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 7, 0, 0, 0, 2]);
    b.extend_from_slice(b"hi");
    b.extend_from_slice(&[0, 0]);
    out.extend(msg(b'B', &b));
    let mut d = vec![b'S'];
    cstr(&mut d, "s1");
    out.extend(msg(b'D', &d));
    out.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    out.extend(msg(b'H', &[]));
    out.extend(msg(b'S', &[]));
    let mut q = Vec::new();
    cstr(&mut q, "copy t from stdin");
    out.extend(msg(b'Q', &q));
    out.extend(msg(b'd', b"1\tone\n"));
    out.extend(msg(b'c', &[]));
    let mut f = vec![0, 0, 0, 42, 0, 1, 0, 0, 0, 1, 0, 0, 0, 4, 1, 2, 3, 4, 0, 0];
    out.extend(msg(b'F', &std::mem::take(&mut f)));
    let mut c = vec![b'P'];
    cstr(&mut c, "s1");
    out.extend(msg(b'C', &c));
    out.extend(msg(b'X', &[]));
    out
}

fn backend_seed() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(msg(b'1', &[]));
    out.extend(msg(b'2', &[]));
    let mut t = vec![0, 2];
    for name in ["a", "b"] {
        cstr(&mut t, name);
        t.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0]);
    }
    out.extend(msg(b'T', &t));
    out.extend(msg(b'D', &[0, 2, 0, 0, 0, 1, b'7', 255, 255, 255, 255]));
    let mut cc = Vec::new();
    cstr(&mut cc, "SELECT 1");
    out.extend(msg(b'C', &cc));
    let mut e = Vec::new();
    for (k, v) in [(b'S', "ERROR"), (b'C', "42P01"), (b'M', "no such table")] {
        e.push(k);
        cstr(&mut e, v);
    }
    e.push(0);
    out.extend(msg(b'E', &e));
    out.extend(msg(b'N', &e));
    let mut a = vec![0, 0, 0, 9];
    cstr(&mut a, "chan");
    cstr(&mut a, "payload");
    out.extend(msg(b'A', &a));
    let mut s = Vec::new();
    cstr(&mut s, "TimeZone");
    cstr(&mut s, "UTC");
    out.extend(msg(b'S', &s));
    out.extend(msg(b'G', &[0, 0, 1, 0, 0]));
    out.extend(msg(b'H', &[0, 0, 1, 0, 0]));
    out.extend(msg(b'd', b"1\tone\n"));
    out.extend(msg(b'c', &[]));
    out.extend(msg(b'V', &[0, 0, 0, 4, 0, 0, 0, 1]));
    out.extend(msg(b'Z', b"I"));
    out
}

/// One random mutation of `seed`: byte flips, insertions, deletions, truncation, a length
/// field rewritten to an extreme, or a splice of two regions.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        if v.is_empty() {
            v.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(v.len());
        match rng.below(7) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = rng.next() as u8,
            2 => v.insert(at, rng.next() as u8),
            3 => {
                v.remove(at);
            }
            4 => v.truncate(at),
            5 if at + 4 <= v.len() => {
                let extreme = [0u32, 3, 4, 5, 0x7fff_ffff, 0xffff_ffff, 1 << 20][rng.below(7)];
                v[at..at + 4].copy_from_slice(&extreme.to_be_bytes());
            }
            _ => {
                let from = rng.below(v.len());
                let len = rng.below(v.len() - from).min(64);
                let part = v[from..from + len].to_vec();
                v.splice(at..at, part);
            }
        }
    }
    v
}

const ROUNDS: usize = 20_000;

fn run(name: &str, seed: &[u8], body: fn(&[u8])) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    body(seed);
    body(&[]);
    for _ in 0..ROUNDS {
        body(&mutate(&mut rng, seed));
    }
    for _ in 0..ROUNDS / 10 {
        let n = rng.below(256);
        let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        body(&noise);
    }
}

#[test]
fn pg_frontend_never_panics() {
    run("pg_frontend", &frontend_seed(), custody_fuzz::pg_frontend);
}

#[test]
fn pg_backend_never_panics() {
    run("pg_backend", &backend_seed(), custody_fuzz::pg_backend);
}

#[test]
fn pg_session_never_panics() {
    // Interleave the two seeds as the session body expects: 0x00-prefixed chunks are the
    // client's, 0x01-prefixed the server's, separated by 0xff.
    let fe = frontend_seed();
    let fe = &fe[pg::startup_message(&[("user", "alice"), ("database", "db")]).len()..];
    let mut seed = vec![0u8];
    seed.extend_from_slice(fe);
    seed.extend_from_slice(&[0xff, 1]);
    seed.extend_from_slice(&backend_seed());
    run("pg_session", &seed, custody_fuzz::pg_session);
}

#[test]
fn tunnel_never_panics() {
    use custody_proto::pb::v1::StreamOpen;
    let open = StreamOpen {
        resource: "demo-pg".into(),
        token: "eyJhbGciOiJFZERTQSJ9.e30.sig".into(),
        ..Default::default()
    };
    run("tunnel", &custody_proto::tunnel::encode(&open), custody_fuzz::tunnel);
}

#[test]
fn entry_never_panics() {
    let prev = [7u8; 32];
    let e = custody_proto::entry::Entry::encode(0, 1_700_000_000_000_000_000, &[0u8; 32], b"event");
    let mut seed = e.clone();
    seed.push(0xff);
    seed.extend(custody_proto::entry::Entry::encode(1, 1_700_000_000_000_000_001, &prev, b"next"));
    run("entry", &seed, custody_fuzz::entry);
}

#[test]
fn note_never_panics() {
    use custody_proto::note::{Checkpoint, NoteSigner, SignedNote};
    let s = NoteSigner::new("custody.test/ledger-1", ed25519_dalek::SigningKey::from_bytes(&[3u8; 32])).unwrap();
    let text = Checkpoint { origin: "custody.test/ledger".into(), size: 42, root: [5u8; 32], extensions: vec![] }.to_text();
    let note = SignedNote { text: text.clone(), signatures: vec![s.sign(&text)] }.encode();
    let seed = format!("{}\n\0{note}", s.verifier());
    run("note", seed.as_bytes(), custody_fuzz::note);
}

#[test]
fn block_never_panics() {
    use custody_proto::block::BlockHeader;
    let b0 = BlockHeader::next(None, 16, [1u8; 32], 1).unwrap();
    let b1 = BlockHeader::next(Some(&b0), 40, [2u8; 32], 2).unwrap();
    let mut seed = b0.encode();
    seed.extend(b1.encode());
    run("block", &seed, custody_fuzz::block);
}
