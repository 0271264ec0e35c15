//! Cancel keys of live sessions, so a CancelRequest arriving on a new stream reaches the
//! backend running the caller's statement.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Where a cancel key leads.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// Resource name.
    pub resource: String,
    /// Session the key belongs to.
    pub session_id: String,
}

/// The proxy's live cancel keys.
#[derive(Debug, Clone, Default)]
pub struct CancelRegistry {
    inner: Arc<Mutex<HashMap<(i32, Bytes), CancelTarget>>>,
}

/// Removes a key when its session ends.
pub struct CancelGuard {
    registry: CancelRegistry,
    key: (i32, Bytes),
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.inner.lock() {
            m.remove(&self.key);
        }
    }
}

impl CancelRegistry {
    /// Registers a session's key.
    pub fn register(&self, pid: i32, key: Bytes, resource: &str, session_id: &str) -> CancelGuard {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(
                (pid, key.clone()),
                CancelTarget {
                    resource: resource.to_string(),
                    session_id: session_id.to_string(),
                },
            );
        }
        CancelGuard {
            registry: self.clone(),
            key: (pid, key),
        }
    }

    /// Finds the session a key belongs to.
    pub fn lookup(&self, pid: i32, key: &[u8]) -> Option<CancelTarget> {
        let m = self.inner.lock().ok()?;
        m.get(&(pid, Bytes::copy_from_slice(key))).cloned()
    }
}
