//! [`Stamp`]: a version of a file, without reading it.

use std::path::Path;
use std::time::SystemTime;

/// What identifies a version of a file the server reloads (a CRL, the ticket keys): its
/// modification time, size and (on Unix) inode, so that a file renamed over the old one is seen
/// even within the file system's time granularity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    /// `None` when the file cannot be read (gone, for example).
    pub(crate) fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        })
    }
}
