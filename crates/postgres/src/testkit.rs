//! A throwaway PostgreSQL cluster for tests: `initdb` in a temporary directory (owned by the
//! `postgres` user when the tests run as root, since `initdb` refuses root), a free loopback
//! port, `fsync=off`, password authentication; one database per test; stopped and removed on
//! drop.
//!
//! Without PostgreSQL installed, [`PgCluster::start`] prints why the test skips and returns
//! `None`; with `PORTCULLIS_REQUIRE_POSTGRES` set (as in CI) it panics instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable that makes a missing PostgreSQL a failure.
pub const REQUIRE_ENV: &str = "PORTCULLIS_REQUIRE_POSTGRES";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    as_postgres: bool,
    next_db: AtomicU32,
}

impl PgCluster {
    /// Starts a cluster, or `None` (after a SKIP line naming `test`) when PostgreSQL is not
    /// installed and [`REQUIRE_ENV`] is not set.
    pub fn start(test: &str) -> Option<Self> {
        let Some(bin) = find_bin() else {
            let why = "no PostgreSQL binaries (initdb, pg_ctl) found: install them with \
                       `apt-get install postgresql`, or name their directory in PORTCULLIS_PG_BIN";
            if std::env::var_os(REQUIRE_ENV).is_some() {
                panic!("{REQUIRE_ENV} is set but {why}");
            }
            println!("SKIP {test}: {why} (set {REQUIRE_ENV}=1 to make this a failure)");
            eprintln!("SKIP {test}: {why}");
            return None;
        };
        Some(Self::start_with(bin).unwrap_or_else(|e| panic!("throwaway PostgreSQL: {e}")))
    }

    fn start_with(bin: PathBuf) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let as_postgres = is_root();
        let mut bytes = [0u8; 12];
        portcullis_core::Random::fill(&portcullis_core::SystemRandom::new(), &mut bytes)
            .map_err(|e| format!("random password: {e}"))?;
        let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.path().join("pw"), &password).map_err(|e| e.to_string())?;
        if as_postgres {
            run(Command::new("chown").args(["-R", "postgres:", path(dir.path())]))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("free port: {e}"))?
            .port();
        let cluster = Self {
            bin,
            dir,
            port,
            password,
            as_postgres,
            next_db: AtomicU32::new(0),
        };
        let data = cluster.dir.path().join("data");
        cluster.pg(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--pwfile",
                path(&cluster.dir.path().join("pw")),
                "--no-sync",
            ],
        )?;
        cluster.pg_start()?;
        Ok(cluster)
    }

    /// Starts the server of the cluster: every statement is logged, each line prefixed with
    /// its database's name ([`PgCluster::statements`]).
    fn pg_start(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=off -c full_page_writes=off \
             -c log_statement=all -c log_line_prefix='%d '",
            self.port,
            path(self.dir.path())
        );
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path(&self.dir.path().join("data")),
                "-o",
                &options,
                "-l",
                path(&self.dir.path().join("log")),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: what a crash looks like to the
    /// clients); [`PgCluster::restart`] starts it again on the same port and data.
    pub fn stop(&self) {
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path(&self.dir.path().join("data")),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
        .unwrap_or_else(|e| panic!("stop the throwaway cluster: {e}"));
    }

    /// Starts the server again after [`PgCluster::stop`].
    pub fn restart(&self) {
        self.pg_start()
            .unwrap_or_else(|e| panic!("restart the throwaway cluster: {e}"));
    }

    /// The statements the server ran in database `db` so far, in order, as its log has them
    /// (`statement: …` for a simple query, `execute <name>: …` for a prepared one): one per
    /// round trip of a client that does not pipeline.
    pub fn statements(&self, db: &str) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        let prefix = format!("{db} LOG:  ");
        log.lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .filter(|rest| rest.starts_with("statement: ") || rest.starts_with("execute "))
            .map(str::to_owned)
            .collect()
    }

    /// The port the cluster listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` for the superuser.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}?sslmode=disable",
            self.password, self.port
        )
    }

    /// The URL of `db` with a wrong password.
    pub fn url_with_wrong_password(&self, db: &str) -> String {
        format!(
            "postgres://postgres:not-{}@127.0.0.1:{}/{db}?sslmode=disable",
            self.password, self.port
        )
    }

    /// The password of the superuser (to check that messages never show it).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The name of the database of a URL from [`PgCluster::database`].
    pub fn database_name(url: &str) -> &str {
        url.rsplit('/')
            .next()
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
    }

    /// A new empty database; its URL.
    pub async fn database(&self) -> String {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{n}");
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect to the throwaway cluster: {e}"));
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        drop(client);
        let _ = task.await;
        self.url(&name)
    }

    /// [`PgCluster::database`] from synchronous code (not inside an async runtime).
    pub fn database_blocking(&self) -> String {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the test")
            .block_on(self.database())
    }

    fn pg(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args);
        run(&mut cmd)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.pg(
            "pg_ctl",
            &["-D", path(&data), "-m", "immediate", "-w", "stop"],
        );
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The directory of `initdb` and `pg_ctl`: `PORTCULLIS_PG_BIN`, `pg_config --bindir`, or the
/// newest `/usr/lib/postgresql/*/bin` (Debian's layout).
fn find_bin() -> Option<PathBuf> {
    let has = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PORTCULLIS_PG_BIN").map(PathBuf::from) {
        return has(&dir).then_some(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
