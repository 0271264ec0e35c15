//! Where a ledger node keeps its files:
//!
//! ```text
//! DATA_DIR/
//!   raft/                 the Raft log (RocksDB)                       raft_log::RaftLogStore
//!   state-<N>/            the state machine (RocksDB)                  store::Store
//!   STATE                 which state-<N> is current ("state-3\n")
//!   snapshots/out/<name>  checkpoints of the state machine this node offers followers
//!   snapshots/in/<name>   a checkpoint fetched from the leader, before it is installed
//! ```
//!
//! Installing a snapshot moves a fetched checkpoint to `state-<N+1>` and then switches
//! `STATE` with an atomic rename, so a crash at any point leaves one complete state machine
//! that matches what the Raft log says was applied.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A node's data directory.
#[derive(Debug, Clone)]
pub struct DataLayout {
    root: PathBuf,
}

impl DataLayout {
    /// The layout under `root` (created if missing).
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let l = Self { root: root.to_path_buf() };
        std::fs::create_dir_all(l.snapshots_out())?;
        std::fs::create_dir_all(l.snapshots_in())?;
        Ok(l)
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The Raft log's database.
    pub fn raft_dir(&self) -> PathBuf {
        self.root.join("raft")
    }

    /// Checkpoints offered to followers.
    pub fn snapshots_out(&self) -> PathBuf {
        self.root.join("snapshots").join("out")
    }

    /// Checkpoints fetched from a leader.
    pub fn snapshots_in(&self) -> PathBuf {
        self.root.join("snapshots").join("in")
    }

    fn pointer(&self) -> PathBuf {
        self.root.join("STATE")
    }

    /// Whether anything was ever stored here.
    pub fn is_empty(&self) -> bool {
        !self.raft_dir().exists() && !self.pointer().exists()
    }

    /// The current state machine directory (`state-1` for a new node).
    pub fn state_dir(&self) -> std::io::Result<PathBuf> {
        match std::fs::read_to_string(self.pointer()) {
            Ok(s) => {
                let name = s.trim();
                if !name.starts_with("state-") || name.contains('/') {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} names {name:?}, not a state directory", self.pointer().display()),
                    ));
                }
                Ok(self.root.join(name))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.point_to("state-1")?;
                Ok(self.root.join("state-1"))
            }
            Err(e) => Err(e),
        }
    }

    fn generation(dir: &Path) -> u64 {
        dir.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("state-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    fn point_to(&self, name: &str) -> std::io::Result<()> {
        let tmp = self.root.join("STATE.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{name}")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.pointer())?;
        std::fs::File::open(&self.root)?.sync_all()
    }

    /// Makes `checkpoint` (a complete state-machine database) the current state, and
    /// returns its new directory. The previous directory stays until [`Self::remove_stale`].
    pub fn install(&self, checkpoint: &Path) -> std::io::Result<PathBuf> {
        let next = Self::generation(&self.state_dir()?) + 1;
        let name = format!("state-{next}");
        let dir = self.root.join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(checkpoint, &dir)?;
        std::fs::File::open(&self.root)?.sync_all()?;
        self.point_to(&name)?;
        Ok(dir)
    }

    /// Removes state directories other than the current one.
    pub fn remove_stale(&self) -> std::io::Result<()> {
        let current = self.state_dir()?;
        for e in std::fs::read_dir(&self.root)? {
            let p = e?.path();
            if p != current && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("state-")) {
                std::fs::remove_dir_all(&p)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_switches_the_pointer_and_keeps_one_current_state() {
        let d = tempfile::tempdir().unwrap();
        let l = DataLayout::new(d.path()).unwrap();
        assert!(l.state_dir().unwrap().ends_with("state-1"));
        std::fs::create_dir_all(l.state_dir().unwrap()).unwrap();
        let cp = l.snapshots_in().join("snap-9");
        std::fs::create_dir_all(&cp).unwrap();
        std::fs::write(cp.join("CURRENT"), b"x").unwrap();
        let now = l.install(&cp).unwrap();
        assert!(now.ends_with("state-2") && now.join("CURRENT").exists());
        assert_eq!(l.state_dir().unwrap(), now);
        l.remove_stale().unwrap();
        assert!(!d.path().join("state-1").exists());
    }
}
