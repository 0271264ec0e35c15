//! custody's Merkle proofs, checkpoints and signed notes against independent
//! implementations of the same specs: `tlog_tiles` (a port of Go's sumdb/tlog) and
//! `signed_note` (a port of Go's sumdb/note).

use base64::Engine as _;
use custody_proto::merkle::{self, MemoryTree};
use custody_proto::note::{Checkpoint, NoteSigner, SignedNote, VerifierKey};
use ed25519_dalek::SigningKey;
use signed_note::{Note, StandardSigner, StandardVerifier, Verifier, VerifierList};
use tlog_tiles::tlog::{self, Hash as TlogHash, HashReader};

/// tlog's stored hashes, in its own storage order.
struct Stored(Vec<TlogHash>);

impl HashReader for Stored {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<TlogHash>, tlog::Error> {
        Ok(indexes.iter().map(|i| self.0[*i as usize]).collect())
    }
}

fn records(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("custody entry {i}").into_bytes()).collect()
}

#[test]
fn roots_and_proofs_agree_with_tlog_both_ways() {
    let recs = records(40);
    let mut stored = Stored(Vec::new());
    let mut ours = MemoryTree::new();
    let mut roots = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let new = tlog::stored_hashes(i as u64, r, &stored).unwrap();
        stored.0.extend(new);
        assert_eq!(tlog::record_hash(r).0, merkle::leaf_hash(r));
        ours.push(merkle::leaf_hash(r));
        let th = tlog::tree_hash(i as u64 + 1, &stored).unwrap();
        assert_eq!(th.0, ours.root(), "root at size {}", i + 1);
        roots.push(th);
    }
    for t in 1..=recs.len() as u64 {
        let th = roots[t as usize - 1];
        for n in 0..t {
            // Ours checked by tlog.
            let p: Vec<TlogHash> = merkle::inclusion_proof(&ours, n, t).unwrap().into_iter().map(TlogHash).collect();
            tlog::check_record(&p, t, th, n, tlog::record_hash(&recs[n as usize])).unwrap();
            // tlog's checked by ours.
            let theirs: Vec<[u8; 32]> = tlog::prove_record(t, n, &stored).unwrap().into_iter().map(|h| h.0).collect();
            merkle::verify_inclusion(n, t, &merkle::leaf_hash(&recs[n as usize]), &theirs, &th.0).unwrap();
        }
        for m in 1..=t {
            let hm = roots[m as usize - 1];
            let p: Vec<TlogHash> = merkle::consistency_proof(&ours, m, t).unwrap().into_iter().map(TlogHash).collect();
            tlog::check_tree(&p, t, th, m, hm).unwrap();
            let theirs: Vec<[u8; 32]> = tlog::prove_tree(t, m, &stored).unwrap().into_iter().map(|h| h.0).collect();
            merkle::verify_consistency(m, t, &hm.0, &th.0, &theirs).unwrap();
        }
    }
}

#[test]
fn checkpoints_signed_by_custody_verify_with_signed_note_and_back() {
    let ours = NoteSigner::new("custody.test/ledger-1", SigningKey::from_bytes(&[7u8; 32])).unwrap();
    let cp = Checkpoint { origin: "custody.test/ledger".into(), size: 12345, root: merkle::leaf_hash(b"x"), extensions: vec![] };
    let text = cp.to_text();
    let note = SignedNote { text: text.clone(), signatures: vec![ours.sign(&text)] }.encode();

    // signed_note verifies custody's note with custody's published verifier key.
    let v = StandardVerifier::new(&ours.verifier().to_string()).unwrap();
    assert_eq!(v.name(), "custody.test/ledger-1");
    let known = VerifierList::new(vec![Box::new(v)]);
    let parsed = Note::from_bytes(note.as_bytes()).unwrap();
    let (ok, unknown) = parsed.verify(&known).unwrap();
    assert_eq!((ok.len(), unknown.len()), (1, 0));
    // tlog_tiles reads custody's checkpoint body.
    let tc = tlog_tiles::checkpoint::Checkpoint::from_bytes(parsed.text()).unwrap();
    assert_eq!((tc.origin(), tc.size(), tc.hash().0), ("custody.test/ledger", 12345, cp.root));

    // custody verifies a note that signed_note signed.
    let seed = [9u8; 32];
    let sk = SigningKey::from_bytes(&seed);
    let theirs_v = VerifierKey::new("other.example/log", sk.verifying_key()).unwrap();
    let id = u32::from_be_bytes(theirs_v.id);
    let mut raw = vec![1u8];
    raw.extend_from_slice(&seed);
    let skey = format!("PRIVATE+KEY+other.example/log+{id:08x}+{}", base64::engine::general_purpose::STANDARD.encode(raw));
    let signer = StandardSigner::new(&skey).unwrap();
    let mut n = Note::new(text.as_bytes(), &[]).unwrap();
    n.add_sigs(&[&signer]).unwrap();
    let encoded = String::from_utf8(n.to_bytes()).unwrap();
    let back = SignedNote::parse(&encoded).unwrap();
    assert_eq!(back.verify(&[theirs_v.clone()]).unwrap(), vec!["other.example/log".to_string()]);
    assert_eq!(Checkpoint::parse(&back.text).unwrap(), cp);
    // Its verifier key string is the same as signed_note's.
    assert_eq!(theirs_v.to_string(), signed_note::new_ed25519_verifier_key("other.example/log", &sk.verifying_key()));
}
