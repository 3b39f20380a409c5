//! The Portcullis directory: its files as the commands find them, and writing them (keys
//! private, the rest public, `replaced-<time>/` for what a command replaces). The bottom of the
//! CLI's modules: it depends on none of them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use portcullis_core::layout::DirLayout;
use portcullis_core::{Clock, SystemClock, TicketRing};
use portcullis_tls::devpki::DevCa;

use crate::CliResult;

/// The files of a Portcullis directory (their names: [`DirLayout`]).
pub(crate) struct Layout {
    pub(crate) dir: PathBuf,
    names: DirLayout,
}

impl std::ops::Deref for Layout {
    type Target = DirLayout;

    fn deref(&self) -> &DirLayout {
        &self.names
    }
}

impl Layout {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            names: DirLayout::new(dir),
        }
    }

    /// Checks that `dir` looks like a Portcullis directory before a command uses it.
    pub(crate) fn existing(dir: &Path) -> CliResult<Self> {
        let layout = Self::new(dir);
        if !dir.is_dir() {
            return Err(format!(
                "{}: no such directory; create it with `portcullis init --dir {}`",
                dir.display(),
                dir.display()
            ));
        }
        // A directory made by `portcullis init` holds the CA certificate, whichever registry
        // it uses.
        if !layout.ca_cert().is_file() && !layout.registry().is_file() {
            return Err(format!(
                "{}: no CA certificate (ca.pem) nor registry (portcullis.db) in this directory; is it a Portcullis directory made by `portcullis init`?",
                dir.display()
            ));
        }
        Ok(layout)
    }

    /// Checks that the directory's own registry file (`DIR/portcullis.db`) is there and not
    /// empty: a registry file that lost its content must not turn silently into a new, empty
    /// registry.
    pub(crate) fn check_registry_file(&self) -> CliResult {
        let registry = self.registry();
        match fs::metadata(&registry) {
            Ok(meta) if meta.len() == 0 => Err(format!(
                "{}: the registry file is empty; not a registry made by `portcullis init`",
                registry.display()
            )),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "{}: no registry (portcullis.db) in this directory; is it a Portcullis directory made by `portcullis init`? (a registry elsewhere: --registry URL)",
                self.dir.display()
            )),
            Err(e) => Err(format!("{}: cannot read: {e}", registry.display())),
        }
    }

    /// Loads the dev CA (certificate and key).
    pub(crate) fn load_ca(&self) -> CliResult<DevCa> {
        let cert = read_text(&self.ca_cert())?;
        let key = read_text(&self.ca_key())?;
        DevCa::from_pem(&cert, &key).map_err(|e| format!("{}: {e}", self.ca_cert().display()))
    }

    /// Loads the ticket keys, if `init` made them.
    pub(crate) fn load_ticket_ring(&self) -> CliResult<Option<TicketRing>> {
        self.names.load_ticket_ring().map_err(|e| e.to_string())
    }
}

pub(crate) fn read_text(path: &Path) -> CliResult<String> {
    fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// Writes a file that only the owner may read (keys).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> CliResult {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    // `mode` applies only to a new file; `init --force` rewrites existing ones.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: cannot set permissions: {e}", path.display()))?;
    }
    file.write_all(bytes)
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

pub(crate) fn write_public(path: &Path, bytes: &[u8]) -> CliResult {
    fs::write(path, bytes).map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

/// Creates a new `DIR/replaced-<UTC time>/` (mode 0700), where files that a command replaces
/// are kept.
pub(crate) fn replaced_dir(layout: &Layout) -> CliResult<PathBuf> {
    let stamp = crate::text::format_time(SystemClock.now_ms()).replace([':', '-'], "");
    let mut aside = layout.dir.join(format!("replaced-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = layout.dir.join(format!("replaced-{stamp}-{n}"));
    }
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(&aside)
        .map_err(|e| format!("{}: cannot create: {e}", aside.display()))?;
    Ok(aside)
}

/// Makes the entries of directory `dir` (files created, renamed or removed in it) durable.
pub(crate) fn sync_dir(dir: &Path) -> CliResult {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: cannot sync: {e}", dir.display()))
}
