//! The files of a Portcullis directory, as `portcullis init` makes it: the one place that
//! knows their names, for the CLI, `PortcullisServer::from_dir` and `Client::from_dir`.
//!
//! ```text
//! DIR/ca.pem, ca-key.pem          the dev CA
//! DIR/server.pem, server-key.pem  the server's certificate chain and key
//! DIR/portcullis.db               the SQLite registry
//! DIR/registry.key                the key that seals the registry's TOTP secrets
//! DIR/ticket.key                  the key that seals session tickets
//! DIR/ticket-retired/MS.key       ticket keys replaced at Unix ms MS, kept while tickets they
//!                                 sealed may still be valid (`portcullis keys rotate-ticket`)
//! DIR/registry.key.new            a registry key being put in place (`portcullis keys rekey`)
//! DIR/devices/NAME.pem, NAME-key.pem
//!                                 device certificates and keys
//! DIR/sessions/DEVICE/USER@NAME@HOST:PORT
//!                                 session tickets a client stored (mode 0600)
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::{TicketKey, TicketRing};

/// The paths of a Portcullis directory (nothing is read until a `load_` method is called).
///
/// ```
/// use portcullis_core::layout::DirLayout;
///
/// let dir = DirLayout::new("pc");
/// assert_eq!(dir.device_cert("laptop"), std::path::Path::new("pc/devices/laptop.pem"));
/// assert_eq!(dir.registry(), std::path::Path::new("pc/portcullis.db"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirLayout {
    dir: PathBuf,
}

impl DirLayout {
    /// The layout of the directory `dir`.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM), the trust anchor of servers and clients.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA's private key (PEM), used by `portcullis device issue` only.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    /// The server's certificate chain (PEM).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key (PEM).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }

    /// The SQLite registry.
    pub fn registry(&self) -> PathBuf {
        self.dir.join("portcullis.db")
    }

    /// The key that seals the TOTP secrets in the registry.
    pub fn registry_key(&self) -> PathBuf {
        self.dir.join("registry.key")
    }

    /// The key that seals session tickets (32 bytes).
    pub fn ticket_key(&self) -> PathBuf {
        self.dir.join("ticket.key")
    }

    /// The registry key being put in place by `portcullis keys rekey`: present only while a
    /// rekey runs, or after one was interrupted.
    pub fn registry_key_new(&self) -> PathBuf {
        self.dir.join("registry.key.new")
    }

    /// The directory of retired ticket keys, one file `<Unix ms of the rotation>.key` each.
    pub fn retired_ticket_keys(&self) -> PathBuf {
        self.dir.join("ticket-retired")
    }

    /// The directory of device certificates and keys.
    pub fn devices(&self) -> PathBuf {
        self.dir.join("devices")
    }

    /// The certificate chain (PEM) of device `name`.
    pub fn device_cert(&self, name: &str) -> PathBuf {
        self.devices().join(format!("{name}.pem"))
    }

    /// The private key (PEM) of device `name`.
    pub fn device_key(&self, name: &str) -> PathBuf {
        self.devices().join(format!("{name}-key.pem"))
    }

    /// The directory of the session tickets stored for device `name`.
    pub fn sessions(&self, device: &str) -> PathBuf {
        self.dir.join("sessions").join(file_part(device))
    }

    /// Loads the ticket key, or `None` when the directory has none. A file that is not exactly
    /// 32 bytes is an error naming it.
    pub fn load_ticket_key(&self) -> io::Result<Option<TicketKey>> {
        let path = self.ticket_key();
        if !path.exists() {
            return Ok(None);
        }
        load_key_file(&path).map(Some)
    }
}

impl DirLayout {
    /// Loads the ticket keys: `ticket.key` as the current key, and each retired key in
    /// `ticket-retired/` with the time of its rotation (from its name). `None` when the
    /// directory has no `ticket.key`. A file that is not a 32-byte key, or a name that is not
    /// `<Unix ms>.key`, is an error naming it.
    pub fn load_ticket_ring(&self) -> io::Result<Option<TicketRing>> {
        let Some(current) = self.load_ticket_key()? else {
            return Ok(None);
        };
        let mut ring = TicketRing::new(current);
        for (key, retired_ms) in self.load_retired_ticket_keys()? {
            ring = ring.with_retired(key, retired_ms);
        }
        Ok(Some(ring))
    }

    /// The retired ticket keys and the Unix ms of their rotation, oldest first (none when the
    /// directory `ticket-retired/` does not exist).
    pub fn load_retired_ticket_keys(&self) -> io::Result<Vec<(TicketKey, u64)>> {
        let mut keys = Vec::new();
        for (path, retired_ms) in self.retired_ticket_key_files()? {
            let retired_ms = retired_ms.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: not a retired ticket key (named <Unix ms>.key); remove it",
                        path.display()
                    ),
                )
            })?;
            keys.push((load_key_file(&path)?, retired_ms));
        }
        keys.sort_by_key(|(_, at)| *at);
        Ok(keys)
    }

    /// The files of `ticket-retired/`, each with the Unix ms of its rotation when its name is
    /// `<Unix ms>.key` (`None` for another name); none when the directory does not exist.
    pub fn retired_ticket_key_files(&self) -> io::Result<Vec<(PathBuf, Option<u64>)>> {
        let dir = self.retired_ticket_keys();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: cannot read: {e}", dir.display()),
                ));
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?
                .path();
            let retired_ms = retired_key_time(&path);
            files.push((path, retired_ms));
        }
        Ok(files)
    }
}

/// The Unix ms a retired ticket key's file name gives, `None` for another name.
fn retired_key_time(path: &Path) -> Option<u64> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".key")?;
    if stem.is_empty() || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// A 32-byte ticket key file.
fn load_key_file(path: &Path) -> io::Result<TicketKey> {
    let bytes = fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: cannot read: {e}", path.display())))?;
    TicketKey::from_bytes(&bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: a ticket key file holds exactly 32 bytes",
                path.display()
            ),
        )
    })
}

/// Why [`read_private`] refused a file.
#[derive(Debug)]
pub enum PrivateFileError {
    /// The file could not be opened or read (it is missing, not UTF-8, ...).
    Io(io::Error),
    /// The group or others may read or write the file; its permission bits.
    Exposed {
        /// The permission bits (`0o640`, ...).
        mode: u32,
    },
    /// The file holds more than the bytes allowed.
    TooLarge {
        /// The most bytes allowed.
        max: u64,
    },
}

/// The text of a file that only its owner may read or write (on Unix: no group or other
/// permission bits), of at most `max` bytes; the text is wiped when dropped. The checks look at
/// the file that was opened, and at most `max + 1` bytes are read. For files that hold a
/// secret or a credential: a TOTP secret file, a stored session ticket.
pub fn read_private(path: &Path, max: u64) -> Result<Zeroizing<String>, PrivateFileError> {
    use std::io::Read;
    let file = fs::File::open(path).map_err(PrivateFileError::Io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file
            .metadata()
            .map_err(PrivateFileError::Io)?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(PrivateFileError::Exposed { mode });
        }
    }
    let mut text = Zeroizing::new(String::new());
    file.take(max.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(PrivateFileError::Io)?;
    if text.len() as u64 > max {
        return Err(PrivateFileError::TooLarge { max });
    }
    Ok(text)
}

/// The name of the file of the session ticket that `user` earned from the server at `addr`
/// (`host:port`) verified as `server_name`, inside a device's sessions directory.
pub fn session_file_name(user: &str, server_name: &str, addr: &str) -> String {
    format!(
        "{}@{}@{}",
        file_part(user),
        file_part(server_name),
        file_part(addr)
    )
}

/// `s` as a part of a file name: ASCII letters, digits and `.-_:[]` stay, every other byte is
/// `%XX`, and a leading `.` too (no hidden files, no `..`).
fn file_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b':' | b'[' | b']')
            || (b == b'.' && i > 0);
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_file_names_stay_inside_their_directory() {
        assert_eq!(
            session_file_name("alice", "localhost", "127.0.0.1:7443"),
            "alice@localhost@127.0.0.1:7443"
        );
        assert_eq!(
            session_file_name("../x", "a/b", "[::1]:1"),
            "%2E.%2Fx@a%2Fb@[::1]:1"
        );
        assert_eq!(
            DirLayout::new("d").sessions(".."),
            Path::new("d/sessions/%2E.")
        );
        // Distinct inputs, distinct names: `@` is escaped inside a part.
        assert_ne!(
            session_file_name("a@b", "c", "d:1"),
            session_file_name("a", "b@c", "d:1")
        );
    }

    #[test]
    fn a_private_file_is_read_only_when_its_owner_alone_may_and_within_its_bound() {
        let dir = std::env::temp_dir().join(format!("pc-private-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        assert!(matches!(
            read_private(&file, 8),
            Err(PrivateFileError::Io(e)) if e.kind() == io::ErrorKind::NotFound
        ));
        fs::write(&file, "12345678").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
            assert!(matches!(
                read_private(&file, 8),
                Err(PrivateFileError::Exposed { mode: 0o640 })
            ));
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(read_private(&file, 8).unwrap().as_str(), "12345678");
        assert!(matches!(
            read_private(&file, 7),
            Err(PrivateFileError::TooLarge { max: 7 })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ticket_key_file_is_32_bytes_or_absent() {
        let dir = std::env::temp_dir().join(format!("pc-layout-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let layout = DirLayout::new(&dir);
        let _ = fs::remove_file(layout.ticket_key());
        assert!(layout.load_ticket_key().unwrap().is_none());
        fs::write(layout.ticket_key(), [7u8; 31]).unwrap();
        let e = layout.load_ticket_key().unwrap_err().to_string();
        assert!(
            e.ends_with("ticket.key: a ticket key file holds exactly 32 bytes"),
            "{e}"
        );
        fs::write(layout.ticket_key(), [7u8; 32]).unwrap();
        assert!(layout.load_ticket_key().unwrap().is_some());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ring_holds_the_current_key_and_each_retired_one_with_its_time() {
        let dir = std::env::temp_dir().join(format!("pc-ring-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let layout = DirLayout::new(&dir);
        assert!(layout.load_ticket_ring().unwrap().is_none());
        fs::write(layout.ticket_key(), [1u8; 32]).unwrap();
        let ring = layout.load_ticket_ring().unwrap().unwrap();
        assert_eq!(ring.retired().count(), 0);
        fs::create_dir(layout.retired_ticket_keys()).unwrap();
        fs::write(layout.retired_ticket_keys().join("2000.key"), [2u8; 32]).unwrap();
        fs::write(layout.retired_ticket_keys().join("1000.key"), [3u8; 32]).unwrap();
        let ring = layout.load_ticket_ring().unwrap().unwrap();
        let ids: Vec<_> = ring.retired().collect();
        let id = |b: u8| TicketKey::from_bytes(&[b; 32]).unwrap().id();
        assert_eq!(ids, vec![(id(2), 2000), (id(3), 1000)]);
        assert_eq!(ring.current().id(), id(1));
        fs::write(layout.retired_ticket_keys().join("notes.txt"), b"x").unwrap();
        let e = layout.load_ticket_ring().unwrap_err().to_string();
        assert!(
            e.ends_with("notes.txt: not a retired ticket key (named <Unix ms>.key); remove it"),
            "{e}"
        );
        fs::remove_file(layout.retired_ticket_keys().join("notes.txt")).unwrap();
        fs::write(layout.retired_ticket_keys().join("3000.key"), [4u8; 16]).unwrap();
        let e = layout.load_ticket_ring().unwrap_err().to_string();
        assert!(
            e.ends_with("3000.key: a ticket key file holds exactly 32 bytes"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
