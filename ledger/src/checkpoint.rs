//! This node's checkpoint signer: its own ed25519 key, and the rule that it never signs two
//! checkpoints that contradict each other.
//!
//! Each ledger node holds its own key (`checkpoint.key` in its data directory, mode 0600,
//! made on first start) under the key name `<origin>/<node id>`, so a checkpoint that all
//! nodes sign carries one cosignature per node. Before signing `(size, root)` the node checks
//! it against the last checkpoint it signed (`checkpoint-signed.json`), with a consistency
//! proof from its own tree: a tree that was rewritten, truncated or forked under it fails
//! that check, and the node refuses to sign and logs an alarm instead.
//!
//! **Rotation** (`custody-ledger rotate-key`): the node's new key keeps the same name, so it
//! gets a new key id; the old public key is kept in `checkpoint-keys.retired` (one verifier
//! key per line) and still published, so checkpoints it signed stay verifiable, and the
//! signed-state file is kept, so the new key never signs what contradicts the old one's
//! checkpoints. The old private key is deleted.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use custody_proto::merkle::{self, Hash, NodeSource};
use custody_proto::note::{Checkpoint, NoteError, NoteSigner, SignedNote, VerifierKey};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a checkpoint was not signed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The key or the signed-state file could not be read or written.
    #[error("checkpoint key or state in {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// A file is malformed.
    #[error("{0}")]
    Corrupt(String),
    /// Signing would contradict a checkpoint this node signed before.
    #[error("refusing to sign size {size}: {reason}")]
    Inconsistent {
        /// The size asked for.
        size: u64,
        /// What contradicts.
        reason: String,
    },
    /// Reading the tree failed.
    #[error("reading the Merkle tree: {0}")]
    Tree(String),
    /// The key name is not a valid note key name.
    #[error(transparent)]
    Note(#[from] NoteError),
}

/// The last checkpoint this node signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Signed {
    size: u64,
    root: String,
}

/// Signs checkpoints with this node's key.
pub struct CheckpointSigner {
    origin: String,
    signer: NoteSigner,
    state_path: PathBuf,
    last: Option<(u64, Hash)>,
    retired: Vec<VerifierKey>,
}

const KEY_FILE: &str = "checkpoint.key";
const RETIRED_FILE: &str = "checkpoint-keys.retired";

fn read_seed(path: &Path) -> Result<Option<[u8; 32]>, CheckpointError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b.try_into().map_err(|_| CheckpointError::Corrupt(format!("{} is not a 32-byte ed25519 seed", path.display())))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

fn new_seed() -> Result<[u8; 32], CheckpointError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| CheckpointError::Corrupt(format!("no randomness for a new key: {e}")))?;
    Ok(seed)
}

fn read_retired(dir: &Path) -> Result<Vec<VerifierKey>, CheckpointError> {
    let path = dir.join(RETIRED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&path)(e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| VerifierKey::parse(l.trim()).map_err(|e| CheckpointError::Corrupt(format!("{}: {e}", path.display()))))
        .collect()
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner").field("origin", &self.origin).field("key", &self.signer.verifier().to_string()).field("last", &self.last).finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io { path: path.to_path_buf(), error }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(())
}

impl CheckpointSigner {
    /// Opens (or on first start creates) the key and signed state in `dir`.
    pub fn open(dir: &Path, origin: &str, node_name: &str) -> Result<Self, CheckpointError> {
        let key_path = dir.join(KEY_FILE);
        let seed = match read_seed(&key_path)? {
            Some(s) => s,
            None => {
                let seed = new_seed()?;
                write_private(&key_path, &seed)?;
                seed
            }
        };
        let signer = NoteSigner::new(&format!("{origin}/{node_name}"), SigningKey::from_bytes(&seed))?;
        let state_path = dir.join("checkpoint-signed.json");
        let last = match std::fs::read(&state_path) {
            Ok(b) => {
                let s: Signed = serde_json::from_slice(&b).map_err(|e| CheckpointError::Corrupt(format!("{}: {e}", state_path.display())))?;
                let root: Hash = B64
                    .decode(&s.root)
                    .ok()
                    .and_then(|r| r.try_into().ok())
                    .ok_or_else(|| CheckpointError::Corrupt(format!("{}: root is not a base64 hash", state_path.display())))?;
                Some((s.size, root))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&state_path)(e)),
        };
        let retired = read_retired(dir)?;
        Ok(Self { origin: origin.into(), signer, state_path, last, retired })
    }

    /// Replaces the key in `dir` with a new one, keeping the old public key (as the verifier
    /// key `<origin>/<node_name>+<old id>+...`) in the retired list. Returns (old, new).
    /// The node must be restarted to use it.
    pub fn rotate(dir: &Path, origin: &str, node_name: &str) -> Result<(VerifierKey, VerifierKey), CheckpointError> {
        let name = format!("{origin}/{node_name}");
        let key_path = dir.join(KEY_FILE);
        let old_seed = read_seed(&key_path)?.ok_or_else(|| CheckpointError::Corrupt(format!("{} does not exist: nothing to rotate (the node makes its key on first start)", key_path.display())))?;
        let old = NoteSigner::new(&name, SigningKey::from_bytes(&old_seed))?.verifier().clone();
        let new_seed = new_seed()?;
        let new = NoteSigner::new(&name, SigningKey::from_bytes(&new_seed))?.verifier().clone();
        // The old public key first, so that a crash in between never loses it.
        let mut retired = read_retired(dir)?;
        if !retired.contains(&old) {
            retired.push(old.clone());
        }
        let text: String = retired.iter().map(|k| format!("{k}\n")).collect();
        write_private(&dir.join(RETIRED_FILE), text.as_bytes())?;
        write_private(&key_path, &new_seed)?;
        Ok((old, new))
    }

    /// Keys this node signed with before, still published so that their checkpoints verify.
    pub fn retired(&self) -> &[VerifierKey] {
        &self.retired
    }

    /// This node's verifier key, as published (`name+keyid+base64`).
    pub fn verifier(&self) -> &VerifierKey {
        self.signer.verifier()
    }

    /// The last checkpoint this node signed: size and root.
    pub fn last_signed(&self) -> Option<(u64, Hash)> {
        self.last
    }

    /// The checkpoint origin.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Signs the checkpoint of the tree in `tree` at `size`, after checking it against the
    /// last checkpoint this node signed. Returns the signed note.
    pub fn sign<S: NodeSource>(&mut self, tree: &S, size: u64) -> Result<SignedNote, CheckpointError>
    where
        S::Error: std::fmt::Display,
    {
        let t = |e: S::Error| CheckpointError::Tree(e.to_string());
        let root = merkle::root(tree, size).map_err(t)?;
        if let Some((last_size, last_root)) = self.last {
            let (small, small_root, big, big_root) = if size >= last_size { (last_size, last_root, size, root) } else { (size, root, last_size, last_root) };
            if size == last_size && root != last_root {
                return Err(self.alarm(size, format!("it signed size {size} with root {} before; this tree's root there is {}", B64.encode(last_root), B64.encode(root))));
            }
            let proof = merkle::consistency_proof(tree, small, big).map_err(|e| CheckpointError::Tree(e.to_string()))?;
            if let Err(e) = merkle::verify_consistency(small, big, &small_root, &big_root, &proof) {
                return Err(self.alarm(size, format!("this tree is not consistent with the checkpoint it signed last (size {last_size}, root {}): {e}", B64.encode(last_root))));
            }
        }
        let text = Checkpoint { origin: self.origin.clone(), size, root, extensions: vec![] }.to_text();
        let note = SignedNote { text: text.clone(), signatures: vec![self.signer.sign(&text)] };
        if self.last.is_none_or(|(s, _)| size > s) {
            let rec = serde_json::to_vec(&Signed { size, root: B64.encode(root) }).map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
            write_private(&self.state_path, &rec)?;
            self.last = Some((size, root));
        }
        Ok(note)
    }

    fn alarm(&self, size: u64, reason: String) -> CheckpointError {
        let reason = format!("{reason}; this node's log or tree may have been altered: stop it and run `custody-ledger verify --data-dir` on its data");
        tracing::error!(size, alarm = "checkpoint", "refusing to sign a checkpoint: {reason}");
        CheckpointError::Inconsistent { size, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_proto::merkle::{leaf_hash, MemoryTree};

    fn tree(leaves: &[&[u8]]) -> MemoryTree {
        let mut t = MemoryTree::new();
        for l in leaves {
            t.push(leaf_hash(l));
        }
        t
    }

    #[test]
    fn signs_growing_trees_and_refuses_a_rewritten_one_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = CheckpointSigner::open(dir.path(), "custody.test/ledger", "ledger-1").unwrap();
        let good = tree(&[b"a", b"b", b"c", b"d", b"e"]);
        let n3 = s.sign(&good, 3).unwrap();
        assert_eq!(n3.verify(&[s.verifier().clone()]).unwrap(), vec!["custody.test/ledger/ledger-1".to_string()]);
        s.sign(&good, 5).unwrap();
        // An older size of the same tree is consistent, and may be signed again.
        s.sign(&good, 4).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path().join("checkpoint.key")).unwrap().permissions().mode() & 0o777, 0o600);

        // The same key and the same memory of what it signed after a restart.
        let key = s.verifier().clone();
        drop(s);
        let mut s = CheckpointSigner::open(dir.path(), "custody.test/ledger", "ledger-1").unwrap();
        assert_eq!(s.verifier(), &key);
        // A tree whose entry 2 changed: same size, another root; and grown from a fork.
        let forked = tree(&[b"a", b"b", b"X", b"d", b"e", b"f"]);
        for size in [5, 6, 3] {
            let err = s.sign(&forked, size).unwrap_err();
            assert!(matches!(err, CheckpointError::Inconsistent { .. }), "size {size}: {err}");
        }
        // The honest tree still signs.
        let mut grown = good.clone();
        grown.push(leaf_hash(b"f"));
        s.sign(&grown, 6).unwrap();
    }

    #[test]
    fn a_rotated_key_keeps_old_checkpoints_verifiable_and_the_new_key_keeps_the_old_one_s_promises() {
        let dir = tempfile::tempdir().unwrap();
        let origin = "custody.test/ledger";
        let good = tree(&[b"a", b"b", b"c", b"d"]);
        let mut s = CheckpointSigner::open(dir.path(), origin, "ledger-1").unwrap();
        let old_note = s.sign(&good, 4).unwrap();
        let old_key = s.verifier().clone();
        drop(s);
        let (retired, new_key) = CheckpointSigner::rotate(dir.path(), origin, "ledger-1").unwrap();
        assert_eq!(retired, old_key);
        assert_ne!(new_key, old_key);
        assert_eq!(new_key.name, old_key.name, "the same node, a new key id");
        let mut s = CheckpointSigner::open(dir.path(), origin, "ledger-1").unwrap();
        assert_eq!(s.verifier(), &new_key);
        assert_eq!(s.retired(), std::slice::from_ref(&old_key), "the old public key is still published");
        // The old checkpoint verifies with the retired key, not with the new one.
        old_note.verify(std::slice::from_ref(&old_key)).unwrap();
        assert!(old_note.verify(std::slice::from_ref(&new_key)).is_err());
        // The new key signs the grown tree, and refuses a fork of what the old key signed.
        let mut grown = good.clone();
        grown.push(leaf_hash(b"e"));
        s.sign(&grown, 5).unwrap().verify(std::slice::from_ref(&new_key)).unwrap();
        let forked = tree(&[b"a", b"X", b"c", b"d", b"e", b"f"]);
        assert!(matches!(s.sign(&forked, 6), Err(CheckpointError::Inconsistent { .. })));
        // A second rotation keeps both old keys; the private key file stays 0600.
        drop(s);
        CheckpointSigner::rotate(dir.path(), origin, "ledger-1").unwrap();
        let s = CheckpointSigner::open(dir.path(), origin, "ledger-1").unwrap();
        assert_eq!(s.retired().len(), 2);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
