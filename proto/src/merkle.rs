//! The RFC 6962 / RFC 9162 Merkle tree over the ledger's entries: hashing, building from
//! stored nodes, and inclusion and consistency proofs with their verification. No I/O.
//!
//! ```text
//! leaf_hash(entry)  = SHA-256(0x00 || entry)        entry: the canonical bytes, see `entry`
//! node_hash(l, r)   = SHA-256(0x01 || l || r)
//! MTH({})           = SHA-256("")
//! MTH(D[n])         = node_hash(MTH(D[0:k]), MTH(D[k:n]))   k: largest power of two < n
//! ```
//!
//! **Storage.** The ledger stores the hash of every *complete* subtree, keyed by
//! `(level, index)`: the node at level `l` and index `i` covers leaves `[i·2^l, (i+1)·2^l)`.
//! Appending leaf `n` adds the node `(0, n)` and each parent it completes ([`nodes_completed_by`]).
//! Any range a proof needs is a complete subtree or a right edge made of at most
//! `log2(n)` complete subtrees, so a proof costs O(log n) reads of [`NodeSource`].
//!
//! **Verification** follows RFC 9162 §2.1.3.2 and §2.1.4.2 term by term; a failure names
//! the check that failed ([`ProofError`]).

use sha2::{Digest, Sha256};
use thiserror::Error;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of no bytes.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// Reads stored complete-subtree hashes.
pub trait NodeSource {
    /// Why a read failed (a store error, or a node that should exist but does not).
    type Error;
    /// The hash of the complete subtree at `level` and `index`.
    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error>;
}

/// A read of stored nodes failed, or the request was out of range.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TreeError<E> {
    /// The store failed.
    #[error("reading the tree: {0}")]
    Source(E),
    /// Asked for a proof or root the tree cannot give.
    #[error("{0}")]
    Range(String),
}

/// The nodes that appending the leaf with hash `leaf` at index `size` completes, bottom up:
/// `(0, size)` first, then each parent whose right child it completes. The left siblings are
/// read from `src`.
pub fn nodes_completed_by<S: NodeSource>(src: &S, size: u64, leaf: Hash) -> Result<Vec<(u8, u64, Hash)>, S::Error> {
    let mut out = vec![(0u8, size, leaf)];
    let (mut level, mut index, mut hash) = (0u8, size, leaf);
    while index & 1 == 1 {
        let left = src.node(level, index - 1)?;
        hash = node_hash(&left, &hash);
        level += 1;
        index >>= 1;
        out.push((level, index, hash));
    }
    Ok(out)
}

/// `MTH(D[lo:hi])` from stored nodes. `lo` is a multiple of the largest power of two not
/// above `hi - lo` rounded up, as every range in the RFC's recursion is.
fn range_root<S: NodeSource>(src: &S, lo: u64, hi: u64) -> Result<Hash, S::Error> {
    let n = hi - lo;
    if n.is_power_of_two() && lo % n == 0 {
        return src.node(n.trailing_zeros() as u8, lo >> n.trailing_zeros());
    }
    let k = split(n);
    let left = range_root(src, lo, lo + k)?;
    let right = range_root(src, lo + k, hi)?;
    Ok(node_hash(&left, &right))
}

/// The root of the tree of the first `size` leaves.
pub fn root<S: NodeSource>(src: &S, size: u64) -> Result<Hash, S::Error> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_root(src, 0, size)
}

/// The inclusion proof of leaf `index` in the tree of size `size` (RFC 9162 §2.1.3.1),
/// leaf to root.
pub fn inclusion_proof<S: NodeSource>(src: &S, index: u64, size: u64) -> Result<Vec<Hash>, TreeError<S::Error>> {
    if index >= size {
        return Err(TreeError::Range(format!("index {index} is not in a tree of size {size}")));
    }
    let mut path = Vec::new();
    let (mut lo, mut hi, mut m) = (0u64, size, index);
    // Walk down from the root, remembering each sibling; the proof lists them bottom up.
    while hi - lo > 1 {
        let k = split(hi - lo);
        if m < k {
            path.push(range_root(src, lo + k, hi).map_err(TreeError::Source)?);
            hi = lo + k;
        } else {
            path.push(range_root(src, lo, lo + k).map_err(TreeError::Source)?);
            lo += k;
            m -= k;
        }
    }
    path.reverse();
    Ok(path)
}

/// The consistency proof between the trees of sizes `first` and `second` (RFC 9162
/// §2.1.4.1). Empty when `first` is 0 or equals `second`.
pub fn consistency_proof<S: NodeSource>(src: &S, first: u64, second: u64) -> Result<Vec<Hash>, TreeError<S::Error>> {
    if first > second {
        return Err(TreeError::Range(format!("size {first} is larger than size {second}")));
    }
    if first == 0 || first == second {
        return Ok(Vec::new());
    }
    let mut proof = Vec::new();
    let (mut lo, mut hi, mut m, mut whole) = (0u64, second, first, true);
    loop {
        if m == hi - lo {
            if !whole {
                proof.push(range_root(src, lo, hi).map_err(TreeError::Source)?);
            }
            break;
        }
        let k = split(hi - lo);
        if m <= k {
            proof.push(range_root(src, lo + k, hi).map_err(TreeError::Source)?);
            hi = lo + k;
        } else {
            proof.push(range_root(src, lo, lo + k).map_err(TreeError::Source)?);
            lo += k;
            m -= k;
            whole = false;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// Why a proof does not verify. Each names the check of RFC 9162 that failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange {
        /// The index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The first size is larger than the second.
    #[error("consistency from size {first} to the smaller size {second}")]
    SizesOutOfOrder {
        /// Older size.
        first: u64,
        /// Newer size.
        second: u64,
    },
    /// The proof has more hashes than the tree has levels.
    #[error("the proof has too many hashes: {len}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// The proof ran out before reaching the root.
    #[error("the proof has too few hashes: {len}")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// A proof between equal sizes (or from size 0) must be empty.
    #[error("a proof between sizes {first} and {second} must be empty, this one has {len} hashes")]
    NotEmpty {
        /// Older size.
        first: u64,
        /// Newer size.
        second: u64,
        /// Its length.
        len: usize,
    },
    /// The recomputed root differs from the one given (the checkpoint's).
    #[error("the proof leads to root {computed}, not the expected {expected}", computed = hex(.computed), expected = hex(.expected))]
    RootMismatch {
        /// What the proof gives.
        computed: Hash,
        /// What was expected.
        expected: Hash,
    },
    /// For consistency: the proof does not lead to the older tree's root.
    #[error("the proof leads to an older root {computed}, not the expected {expected}", computed = hex(.computed), expected = hex(.expected))]
    FirstRootMismatch {
        /// What the proof gives.
        computed: Hash,
        /// What was expected.
        expected: Hash,
    },
}

fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies that `leaf` (a leaf hash) is at `index` in the tree of `size` with `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> Result<(), ProofError> {
    let computed = root_from_inclusion(index, size, leaf, proof)?;
    if &computed != root {
        return Err(ProofError::RootMismatch { computed, expected: *root });
    }
    Ok(())
}

/// The root that an inclusion proof leads to.
pub fn root_from_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash]) -> Result<Hash, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(ProofError::TooLong { len: proof.len() });
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::TooShort { len: proof.len() });
    }
    Ok(r)
}

/// Verifies that the tree of `second` leaves with `second_root` extends the tree of `first`
/// leaves with `first_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(first: u64, second: u64, first_root: &Hash, second_root: &Hash, proof: &[Hash]) -> Result<(), ProofError> {
    if first > second {
        return Err(ProofError::SizesOutOfOrder { first, second });
    }
    if first == second || first == 0 {
        if !proof.is_empty() {
            return Err(ProofError::NotEmpty { first, second, len: proof.len() });
        }
        if first == second && first_root != second_root {
            return Err(ProofError::RootMismatch { computed: *first_root, expected: *second_root });
        }
        return Ok(());
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let Some((head, rest)) = path.split_first() else {
        return Err(ProofError::TooShort { len: proof.len() });
    };
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*head, *head);
    for c in rest {
        if s == 0 {
            return Err(ProofError::TooLong { len: proof.len() });
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::TooShort { len: proof.len() });
    }
    if &fr != first_root {
        return Err(ProofError::FirstRootMismatch { computed: fr, expected: *first_root });
    }
    if &sr != second_root {
        return Err(ProofError::RootMismatch { computed: sr, expected: *second_root });
    }
    Ok(())
}

/// An in-memory tree of stored nodes, for verifiers that rebuild a tree from exported
/// entries, and for tests.
#[derive(Debug, Default, Clone)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
    size: u64,
}

impl MemoryTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf by its hash.
    pub fn push(&mut self, leaf: Hash) {
        // The left siblings of the next leaf's path are stored by the pushes before it.
        let nodes = nodes_completed_by(self, self.size, leaf).expect("left siblings are stored");
        for (level, index, hash) in nodes {
            let l = level as usize;
            if self.levels.len() <= l {
                self.levels.push(Vec::new());
            }
            debug_assert_eq!(self.levels[l].len() as u64, index);
            self.levels[l].push(hash);
        }
        self.size += 1;
    }

    /// The root at the current size.
    pub fn root(&self) -> Hash {
        root(self, self.size).expect("a tree holds the nodes of its own root")
    }
}

/// A node the tree does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("no stored node at level {0}, index {1}")]
pub struct MissingNode(pub u8, pub u64);

impl NodeSource for MemoryTree {
    type Error = MissingNode;
    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error> {
        self.levels.get(level as usize).and_then(|l| l.get(index as usize)).copied().ok_or(MissingNode(level, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6962's MTH, straight from its definition.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    /// RFC 6962's PATH.
    fn path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
        let n = leaves.len();
        if n <= 1 {
            return vec![];
        }
        let k = split(n as u64) as usize;
        if m < k {
            let mut p = path(m, &leaves[..k]);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = path(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    /// RFC 6962's SUBPROOF.
    fn subproof(m: usize, leaves: &[Hash], b: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if b { vec![] } else { vec![mth(leaves)] };
        }
        let k = split(n as u64) as usize;
        if m <= k {
            let mut p = subproof(m, &leaves[..k], b);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = subproof(m - k, &leaves[k..], false);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    fn unhex(s: &str) -> Hash {
        let mut h = [0u8; 32];
        for (i, b) in h.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        h
    }

    fn tree_of(leaves: &[Hash]) -> MemoryTree {
        let mut t = MemoryTree::new();
        for l in leaves {
            t.push(*l);
        }
        t
    }

    /// The RFC 6962 test vectors of certificate-transparency (merkle_tree_test.cc): eight
    /// inputs and the root at each size.
    #[test]
    fn roots_match_the_rfc6962_test_vectors() {
        let inputs: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        assert_eq!(empty_root(), unhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        let mut t = MemoryTree::new();
        for (i, input) in inputs.iter().enumerate() {
            t.push(leaf_hash(input));
            assert_eq!(t.root(), unhex(roots[i]), "root at size {}", i + 1);
        }
    }

    /// The worked example of RFC 9162 section 2.1.5 (the 7-leaf tree of the C2SP/CT
    /// documents): its node names, inclusion proofs and consistency proofs, term by term.
    #[test]
    fn the_seven_leaf_worked_example_gives_the_documented_proofs() {
        let d: Vec<Vec<u8>> = (0..7u8).map(|i| vec![b'd', i]).collect();
        let [a, b, c, dd, e, f, j]: [Hash; 7] = core::array::from_fn(|i| leaf_hash(&d[i]));
        let (g, h, i) = (node_hash(&a, &b), node_hash(&c, &dd), node_hash(&e, &f));
        let (k, l) = (node_hash(&g, &h), node_hash(&i, &j));
        let root7 = node_hash(&k, &l);
        let t = tree_of(&[a, b, c, dd, e, f, j]);
        assert_eq!(root(&t, 7).unwrap(), root7);
        // Inclusion: b is [a, h, l]; d0 is [b, h, l]; d3 is [c, g, l]; d4 is [f, j, k]; d6 is [i, k].
        for (index, want) in [(1u64, vec![a, h, l]), (0, vec![b, h, l]), (3, vec![c, g, l]), (4, vec![f, j, k]), (6, vec![i, k])] {
            let p = inclusion_proof(&t, index, 7).unwrap();
            assert_eq!(p, want, "inclusion of d{index}");
            verify_inclusion(index, 7, &t.node(0, index).unwrap(), &p, &root7).unwrap();
        }
        // Consistency: tree A (3 leaves, root H(g, c)) to 7 is [c, d, g, l]; tree B (4,
        // root k) is [l]; tree C (6, root H(k, i)) is [i, j, k].
        for (m, old_root, want) in [(3u64, node_hash(&g, &c), vec![c, dd, g, l]), (4, k, vec![l]), (6, node_hash(&k, &i), vec![i, j, k])] {
            assert_eq!(root(&t, m).unwrap(), old_root, "root of the tree of {m}");
            let p = consistency_proof(&t, m, 7).unwrap();
            assert_eq!(p, want, "consistency {m} -> 7");
            verify_consistency(m, 7, &old_root, &root7, &p).unwrap();
        }
    }

    /// Every index of every tree up to 70 leaves, and every pair of sizes, against the
    /// RFC's recursive definitions; each proof verifies and a changed term does not.
    #[test]
    fn proofs_match_the_reference_for_every_index_and_every_pair_of_sizes() {
        let leaves: Vec<Hash> = (0..70u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let t = tree_of(&leaves);
        for n in 1..=leaves.len() {
            let r = mth(&leaves[..n]);
            assert_eq!(root(&t, n as u64).unwrap(), r, "root {n}");
            for m in 0..n {
                let p = inclusion_proof(&t, m as u64, n as u64).unwrap();
                assert_eq!(p, path(m, &leaves[..n]), "inclusion {m} in {n}");
                verify_inclusion(m as u64, n as u64, &leaves[m], &p, &r).unwrap();
                // Any changed hash fails; so does the wrong index or leaf.
                for i in 0..p.len() {
                    let mut bad = p.clone();
                    bad[i][0] ^= 1;
                    assert!(verify_inclusion(m as u64, n as u64, &leaves[m], &bad, &r).is_err());
                }
                if n > 1 {
                    assert!(verify_inclusion(((m + 1) % n) as u64, n as u64, &leaves[m], &p, &r).is_err());
                }
                assert!(verify_inclusion(m as u64, n as u64, &leaf_hash(b"x"), &p, &r).is_err());
            }
            for m in 0..=n {
                let p = consistency_proof(&t, m as u64, n as u64).unwrap();
                let expect = if m == 0 || m == n { vec![] } else { subproof(m, &leaves[..n], true) };
                assert_eq!(p, expect, "consistency {m} -> {n}");
                let rm = mth(&leaves[..m]);
                verify_consistency(m as u64, n as u64, &rm, &r, &p).unwrap();
                for i in 0..p.len() {
                    let mut bad = p.clone();
                    bad[i][31] ^= 0x80;
                    assert!(verify_consistency(m as u64, n as u64, &rm, &r, &bad).is_err(), "changed term {i} of {m}->{n}");
                }
                if m > 0 && m < n {
                    assert!(verify_consistency(m as u64, n as u64, &leaf_hash(b"fork"), &r, &p).is_err());
                    let mut short = p.clone();
                    short.pop();
                    assert!(verify_consistency(m as u64, n as u64, &rm, &r, &short).is_err());
                    let mut long = p.clone();
                    long.push(r);
                    assert!(verify_consistency(m as u64, n as u64, &rm, &r, &long).is_err());
                }
            }
        }
    }

    #[test]
    fn out_of_range_requests_are_errors_not_panics() {
        let t = tree_of(&[leaf_hash(b"a"), leaf_hash(b"b"), leaf_hash(b"c")]);
        assert!(matches!(inclusion_proof(&t, 3, 3), Err(TreeError::Range(_))));
        assert!(matches!(consistency_proof(&t, 3, 2), Err(TreeError::Range(_))));
        assert_eq!(verify_inclusion(5, 3, &[0; 32], &[], &[0; 32]), Err(ProofError::IndexOutOfRange { index: 5, size: 3 }));
        assert_eq!(verify_inclusion(0, u64::MAX, &[0; 32], &[[0; 32]; 70], &[0; 32]).unwrap_err(), ProofError::TooLong { len: 70 });
        assert!(matches!(verify_consistency(4, 2, &[0; 32], &[0; 32], &[]), Err(ProofError::SizesOutOfOrder { .. })));
        assert!(matches!(verify_consistency(2, 2, &[0; 32], &[0; 32], &[[0; 32]]), Err(ProofError::NotEmpty { .. })));
        assert!(verify_consistency(3, u64::MAX, &[0; 32], &[0; 32], &[]).is_err());
    }
}
