//! C2SP signed notes (<https://c2sp.org/signed-note>) with ed25519 signatures, and the
//! tlog checkpoint body (<https://c2sp.org/tlog-checkpoint>). No I/O, no clock, no
//! randomness: keys are made by the caller.
//!
//! ```text
//! note      = text "\n" 1*signature         text: UTF-8, ends with "\n"
//! signature = "— " name " " base64(key_id || ed25519(text)) "\n"
//! key_id    = SHA-256(name || 0x0A || 0x01 || public_key)[0..4]
//! verifier  = name "+" hex(key_id) "+" base64(0x01 || public_key)
//! checkpoint text = origin "\n" decimal(size) "\n" base64(root) "\n" *(extension "\n")
//! ```
//!
//! A ledger cluster's checkpoint carries one signature line per ledger node (cosignatures
//! by each node's own key); verifiers decide how many of their pinned keys must have signed.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::merkle::Hash;

/// The signature type byte of ed25519 in signed notes.
pub const ALG_ED25519: u8 = 0x01;
/// The most bytes of note this module parses.
pub const MAX_NOTE_BYTES: usize = 1 << 20;
/// The most signature lines a note may carry.
pub const MAX_SIGNATURES: usize = 100;

/// A note, key or checkpoint is malformed, or a signature is bad.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NoteError {
    /// The note breaks the signed-note grammar.
    #[error("malformed note: {0}")]
    Malformed(String),
    /// A verifier or signer key string is malformed.
    #[error("malformed key: {0}")]
    BadKey(String),
    /// A signature by a known key does not verify.
    #[error("the signature of {name} (key {key_id}) does not verify")]
    BadSignature {
        /// Key name.
        name: String,
        /// Key id, hex.
        key_id: String,
    },
    /// No signature by a known key.
    #[error("no signature by a known key (signed by: {0})")]
    NoKnownSignature(String),
    /// The checkpoint body is malformed.
    #[error("malformed checkpoint: {0}")]
    Checkpoint(String),
}

fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty() || name.contains(char::is_whitespace) || name.contains('+') {
        return Err(NoteError::BadKey(format!("key name {name:?} must be non-empty, without spaces or '+'")));
    }
    Ok(())
}

/// The key id of an ed25519 key named `name`.
pub fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(key.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// A named ed25519 key that verifies note signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    /// Key name.
    pub name: String,
    /// Key id.
    pub id: [u8; 4],
    /// Public key.
    pub key: VerifyingKey,
}

impl VerifierKey {
    /// The verifier for `key` under `name`.
    pub fn new(name: &str, key: VerifyingKey) -> Result<Self, NoteError> {
        check_name(name)?;
        Ok(Self { name: name.into(), id: key_id(name, &key), key })
    }

    /// Parses `name+hexid+base64(0x01 || key)`.
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let s = s.trim();
        let mut parts = s.splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::BadKey("a verifier key is name+keyid+base64key".into()));
        };
        check_name(name)?;
        let raw = B64.decode(key).map_err(|e| NoteError::BadKey(format!("key is not base64: {e}")))?;
        let [alg, rest @ ..] = raw.as_slice() else {
            return Err(NoteError::BadKey("empty key".into()));
        };
        if *alg != ALG_ED25519 {
            return Err(NoteError::BadKey(format!("signature type {alg:#04x} is not ed25519 (0x01)")));
        }
        let bytes: [u8; 32] = rest.try_into().map_err(|_| NoteError::BadKey(format!("an ed25519 key is 32 bytes, not {}", rest.len())))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| NoteError::BadKey(format!("not an ed25519 point: {e}")))?;
        let v = Self::new(name, key)?;
        if id.len() != 8 || hex8(&v.id) != id.to_ascii_lowercase() {
            return Err(NoteError::BadKey(format!("key id {id} does not match the key (expected {})", hex8(&v.id))));
        }
        Ok(v)
    }
}

impl std::fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{}+{}", self.name, hex8(&self.id), B64.encode(raw))
    }
}

fn hex8(id: &[u8; 4]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A named ed25519 key that signs notes.
pub struct NoteSigner {
    verifier: VerifierKey,
    key: SigningKey,
}

impl NoteSigner {
    /// A signer for `key` under `name`.
    pub fn new(name: &str, key: SigningKey) -> Result<Self, NoteError> {
        Ok(Self { verifier: VerifierKey::new(name, key.verifying_key())?, key })
    }

    /// Its verifier key.
    pub fn verifier(&self) -> &VerifierKey {
        &self.verifier
    }

    /// The signature line of `text` (which must end with a newline).
    pub fn sign(&self, text: &str) -> NoteSignature {
        let sig = self.key.sign(text.as_bytes());
        NoteSignature { name: self.verifier.name.clone(), key_id: self.verifier.id, signature: sig.to_bytes().to_vec() }
    }
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner").field("verifier", &self.verifier.to_string()).finish_non_exhaustive()
    }
}

/// One signature line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    /// Key name.
    pub name: String,
    /// Key id.
    pub key_id: [u8; 4],
    /// The signature bytes (64 for ed25519).
    pub signature: Vec<u8>,
}

/// A note: its text and its signature lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNote {
    /// The signed text, ending with a newline.
    pub text: String,
    /// Signature lines, in order.
    pub signatures: Vec<NoteSignature>,
}

impl SignedNote {
    /// Parses a signed note.
    pub fn parse(note: &str) -> Result<Self, NoteError> {
        if note.len() > MAX_NOTE_BYTES {
            return Err(NoteError::Malformed(format!("note of {} bytes exceeds {MAX_NOTE_BYTES}", note.len())));
        }
        if note.chars().any(|c| (c as u32) < 0x20 && c != '\n') {
            return Err(NoteError::Malformed("control characters (below U+0020) other than newline".into()));
        }
        // The text ends at the last blank line: signature lines never hold one.
        let split = note.rfind("\n\n").ok_or_else(|| NoteError::Malformed("no blank line before the signatures".into()))?;
        let text = &note[..split + 1];
        let sigs = &note[split + 2..];
        if !sigs.ends_with('\n') {
            return Err(NoteError::Malformed("the last signature line does not end with a newline".into()));
        }
        let mut signatures = Vec::new();
        for line in sigs[..sigs.len() - 1].split('\n') {
            if signatures.len() == MAX_SIGNATURES {
                return Err(NoteError::Malformed(format!("more than {MAX_SIGNATURES} signatures")));
            }
            let rest = line.strip_prefix("— ").ok_or_else(|| NoteError::Malformed(format!("signature line {line:?} does not start with an em dash")))?;
            let (name, b64) = rest.split_once(' ').ok_or_else(|| NoteError::Malformed(format!("signature line {line:?} has no key name")))?;
            check_name(name).map_err(|e| NoteError::Malformed(e.to_string()))?;
            let raw = B64.decode(b64).map_err(|e| NoteError::Malformed(format!("signature of {name} is not base64: {e}")))?;
            if raw.len() < 5 {
                return Err(NoteError::Malformed(format!("signature of {name} is too short")));
            }
            signatures.push(NoteSignature { name: name.into(), key_id: [raw[0], raw[1], raw[2], raw[3]], signature: raw[4..].to_vec() });
        }
        if signatures.is_empty() {
            return Err(NoteError::Malformed("no signature lines".into()));
        }
        Ok(Self { text: text.into(), signatures })
    }

    /// Encodes the note.
    pub fn encode(&self) -> String {
        let mut out = self.text.clone();
        out.push('\n');
        for s in &self.signatures {
            let mut raw = s.key_id.to_vec();
            raw.extend_from_slice(&s.signature);
            out.push_str(&format!("— {} {}\n", s.name, B64.encode(raw)));
        }
        out
    }

    /// Verifies every signature by a key in `known` and returns the names of the keys that
    /// signed. Signatures by unknown keys are ignored, as the spec says; a bad signature by
    /// a known key is an error; so is a note that no known key signed.
    pub fn verify(&self, known: &[VerifierKey]) -> Result<Vec<String>, NoteError> {
        let mut signed = Vec::new();
        for s in &self.signatures {
            let Some(k) = known.iter().find(|k| k.name == s.name && k.id == s.key_id) else {
                continue;
            };
            let bad = || NoteError::BadSignature { name: s.name.clone(), key_id: hex8(&s.key_id) };
            let sig = Signature::from_slice(&s.signature).map_err(|_| bad())?;
            k.key.verify(self.text.as_bytes(), &sig).map_err(|_| bad())?;
            if !signed.contains(&s.name) {
                signed.push(s.name.clone());
            }
        }
        if signed.is_empty() {
            let by: Vec<String> = self.signatures.iter().map(|s| format!("{}+{}", s.name, hex8(&s.key_id))).collect();
            return Err(NoteError::NoKnownSignature(by.join(", ")));
        }
        Ok(signed)
    }
}

/// A tlog checkpoint: the signed head of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin (its unique name).
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Tree root at that size.
    pub root: Hash,
    /// Extension lines (without their newlines).
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The note text.
    pub fn to_text(&self) -> String {
        let mut t = format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root));
        for e in &self.extensions {
            t.push_str(e);
            t.push('\n');
        }
        t
    }

    /// Parses a note text as a checkpoint.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let bad = |m: &str| NoteError::Checkpoint(m.into());
        let body = text.strip_suffix('\n').ok_or_else(|| bad("the text does not end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines.next().filter(|o| !o.is_empty()).ok_or_else(|| bad("no origin line"))?;
        let size = lines.next().ok_or_else(|| bad("no tree size line"))?;
        if size.is_empty() || (size.len() > 1 && size.starts_with('0')) || !size.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("tree size {size:?} is not a decimal without leading zeros")));
        }
        let size: u64 = size.parse().map_err(|_| bad("tree size out of range"))?;
        let root_b64 = lines.next().ok_or_else(|| bad("no root hash line"))?;
        let root: Hash = B64
            .decode(root_b64)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad(&format!("root {root_b64:?} is not 32 bytes of base64")))?;
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if extensions.iter().any(|e| e.is_empty()) {
            return Err(bad("an empty extension line"));
        }
        Ok(Self { origin: origin.into(), size, root, extensions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(name: &str, seed: u8) -> NoteSigner {
        NoteSigner::new(name, SigningKey::from_bytes(&[seed; 32])).unwrap()
    }

    #[test]
    fn a_checkpoint_round_trips_and_verifies_with_every_cosigner() {
        let a = signer("custody.test/ledger-1", 1);
        let b = signer("custody.test/ledger-2", 2);
        let cp = Checkpoint { origin: "custody.test/ledger".into(), size: 7, root: [9u8; 32], extensions: vec![] };
        let text = cp.to_text();
        let note = SignedNote { text: text.clone(), signatures: vec![a.sign(&text), b.sign(&text)] };
        let encoded = note.encode();
        assert!(encoded.starts_with("custody.test/ledger\n7\nCQkJ"));
        let parsed = SignedNote::parse(&encoded).unwrap();
        assert_eq!(parsed, note);
        assert_eq!(Checkpoint::parse(&parsed.text).unwrap(), cp);
        let keys = [a.verifier().clone(), b.verifier().clone()];
        assert_eq!(parsed.verify(&keys).unwrap(), vec!["custody.test/ledger-1".to_string(), "custody.test/ledger-2".to_string()]);
        // Keys round-trip through their text form.
        for k in &keys {
            assert_eq!(&VerifierKey::parse(&k.to_string()).unwrap(), k);
        }
    }

    #[test]
    fn changed_text_unknown_keys_and_bad_encodings_are_refused() {
        let a = signer("ledger-1", 1);
        let text = Checkpoint { origin: "o".into(), size: 1, root: [0; 32], extensions: vec![] }.to_text();
        let note = SignedNote { text: text.clone(), signatures: vec![a.sign(&text)] }.encode();
        let forged = note.replacen("\n1\n", "\n2\n", 1);
        assert!(matches!(SignedNote::parse(&forged).unwrap().verify(&[a.verifier().clone()]), Err(NoteError::BadSignature { .. })));
        let other = signer("ledger-1", 2);
        assert!(matches!(SignedNote::parse(&note).unwrap().verify(&[other.verifier().clone()]), Err(NoteError::NoKnownSignature(_))));
        for bad in ["", "o\n1\n", "no newline", "o\n1\nAAAA\n\n- ledger-1 AAAA\n", "o\n\n— ledger-1 !!!\n"] {
            assert!(SignedNote::parse(bad).is_err(), "{bad:?}");
        }
        for bad in ["o\n01\nAAAA\n", "o\n1\n", "\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n", "o\n-1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"] {
            assert!(Checkpoint::parse(bad).is_err(), "{bad:?}");
        }
        let k = a.verifier().to_string();
        let wrong_id = format!("ledger-1+00000000+{}", k.rsplit('+').next().unwrap());
        assert!(VerifierKey::parse(&wrong_id).is_err());
        assert!(VerifierKey::parse("a b+00000000+AQ==").is_err());
    }
}
