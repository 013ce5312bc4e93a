//! A throw-away PostgreSQL server for one test: a fresh cluster (`initdb -A trust`) in a temp dir,
//! a free loopback port, its Unix socket inside the temp dir, durability off; ready when a real
//! query answers; stopped at once on drop. It never touches a PostgreSQL that may already run on
//! the machine (port 5432, `/var/run/postgresql`).
//!
//! The server binaries come from `$MEND_TEST_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`,
//! else `pg_config --bindir` (`make tools` installs them). PostgreSQL refuses to run as root, so
//! when the tests run as root `initdb` and `postgres` run as the `postgres` system user (through
//! `setpriv`, or `runuser` when there is no `setpriv`) and the temp dir is given to that user.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::Connection;
use tokio::process::{Child, Command};

/// How long a started server may take to answer `SELECT 1`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is re-checked while the server starts.
const READY_POLL: Duration = Duration::from_millis(20);
/// How many ports are tried when another process takes the free port first.
const PORT_ATTEMPTS: usize = 5;
/// How long a stop waits for the postmaster to exit after SIGQUIT, and again after SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The unprivileged user the server runs as when the tests run as root.
const PG_USER: &str = "postgres";
/// At most this much of the server's log goes into an error.
const LOG_TAIL_BYTES: usize = 8 * 1024;

/// A PostgreSQL server of one test, stopped (immediate shutdown) and deleted on drop.
///
/// Measured on the 2-core development machine (PostgreSQL 15, debug build): [`Postgres::start`]
/// takes 0.7-0.8 s when the machine is idle (most of it `initdb`) and 1.2-1.8 s beside a cargo
/// build; two started together take 1.4-2.2 s. [`Postgres::database`] takes 0.05-0.2 s, the drop
/// 30-70 ms.
pub struct Postgres {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    // Dropped (removed) after `drop` has stopped the server.
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Creates a fresh cluster and starts a server on a free loopback port; returns once a query
    /// answers.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let run_as = RunAs::detect().await?;
        let dir = tempfile::Builder::new()
            .prefix("mend-pg-")
            .tempdir()
            .context("cannot create a temp dir for PostgreSQL")?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).with_context(|| format!("cannot create {}", sock.display()))?;
        run_as.give(dir.path())?;
        run_as.give(&sock)?;

        let initdb = run_as
            .command(&bin.join("initdb"), dir.path())
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C")
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("cannot run {}", bin.join("initdb").display()))?;
        if !initdb.status.success() {
            bail!(
                "initdb failed ({}){}:\n{}{}",
                initdb.status,
                run_as.hint(dir.path()),
                String::from_utf8_lossy(&initdb.stdout),
                String::from_utf8_lossy(&initdb.stderr)
            );
        }

        let mut server = Self {
            child: None,
            port: 0,
            data,
            _dir: dir,
        };
        let log = server._dir.path().join("postgres.log");
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let log_file = std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            let child = run_as
                .command(&bin.join("postgres"), server._dir.path())
                .arg("-D")
                .arg(&server.data)
                .args(["-p", &port.to_string()])
                .arg("-k")
                .arg(&sock)
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "fsync=off"])
                .args(["-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", bin.join("postgres").display()))?;
            // From here on a failure drops `server`, which stops the child before the dir goes.
            server.child = Some(child);
            server.port = port;
            match server.wait_ready(&log).await? {
                Ready::Yes => return Ok(server),
                Ready::PortTaken => server.stop(),
            }
        }
        bail!(
            "PostgreSQL could not bind a free port in {PORT_ATTEMPTS} attempts; its last log:\n{}",
            log_tail(&log)
        )
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates the database `name` (letters, digits, `_` and `-`) and returns its URL.
    pub async fn database(&self, name: &str) -> anyhow::Result<String> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            bail!("database name {name:?}: use only letters, digits, `_` and `-`");
        }
        let mut conn = sqlx::PgConnection::connect(&self.url())
            .await
            .with_context(|| format!("cannot connect to {}", self.url()))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        conn.close().await?;
        Ok(self.url_of(name))
    }

    fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Waits until the server answers a query, it exits, or the deadline passes.
    async fn wait_ready(&mut self, log: &Path) -> anyhow::Result<Ready> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut last_error = None;
        loop {
            let child = self.child.as_mut().context("no PostgreSQL child")?;
            if let Some(status) = child.try_wait()? {
                let text = log_tail(log);
                if text.contains("could not bind") || text.contains("Address already in use") {
                    return Ok(Ready::PortTaken);
                }
                bail!("PostgreSQL exited ({status}) before it was ready; its log:\n{text}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                match self.probe().await {
                    Ok(()) => return Ok(Ready::Yes),
                    Err(e) => last_error = Some(e),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let last = last_error.map_or_else(String::new, |e| format!("; last error: {e:#}"));
                bail!(
                    "PostgreSQL not ready after {READY_TIMEOUT:?}{last}; its log:\n{}",
                    log_tail(log)
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// `SELECT 1` through a real connection, and the server on the port is this one (not another
    /// process that took the port first).
    async fn probe(&self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.url()).await?;
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
        let data: String = sqlx::query_scalar("SELECT current_setting('data_directory')")
            .fetch_one(&mut conn)
            .await?;
        conn.close().await?;
        if one != 1 || Path::new(&data) != self.data {
            bail!("another server answers on port {}", self.port);
        }
        Ok(())
    }

    /// Stops the server at once: SIGQUIT to the postmaster (immediate shutdown: it ends its
    /// backends and removes its shared memory), SIGKILL if it is not gone within `STOP_TIMEOUT`.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        // Under `runuser` the child is runuser and the postmaster its child: take the pid the
        // postmaster wrote.
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
            .or_else(|| child.id());
        let quit = pid.is_some_and(|pid| {
            std::process::Command::new("kill")
                .args(["-s", "QUIT", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !(quit && wait_exit(&mut child, STOP_TIMEOUT)) {
            let _ = child.start_kill();
            wait_exit(&mut child, STOP_TIMEOUT);
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Ready {
    Yes,
    PortTaken,
}

/// Polls until the child has exited; false if it has not by `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if std::time::Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// The directory with `initdb` and `postgres`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("MEND_TEST_PG_BIN") {
        let d = PathBuf::from(d);
        if !has_server(&d) {
            bail!(
                "MEND_TEST_PG_BIN={} has no initdb and postgres",
                d.display()
            );
        }
        return Ok(d);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&d) {
            return Ok(d);
        }
    }
    bail!(
        "no PostgreSQL server binaries (initdb, postgres): run `make tools` (installs Debian's \
         postgresql package) or set MEND_TEST_PG_BIN to their directory"
    )
}

/// Who runs `initdb` and `postgres`: this process's user, or (when that is root) `postgres`.
enum RunAs {
    Me,
    User { uid: u32, gid: u32, via: Via },
}

enum Via {
    Setpriv(PathBuf),
    Runuser(PathBuf),
}

impl RunAs {
    async fn detect() -> anyhow::Result<Self> {
        if !is_root() {
            return Ok(Self::Me);
        }
        let id = |flag: &'static str| async move {
            let out = Command::new("id")
                .args([flag, PG_USER])
                .stdin(Stdio::null())
                .output()
                .await
                .ok()?;
            if !out.status.success() {
                return None;
            }
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .ok()
        };
        let (Some(uid), Some(gid)) = (id("-u").await, id("-g").await) else {
            bail!(
                "the tests run as root, which PostgreSQL refuses, and there is no `{PG_USER}` user \
                 to run it as: run `make tools` (Debian's postgresql package creates it) or \
                 `useradd --system {PG_USER}`"
            );
        };
        let via = if let Some(p) = in_path("setpriv") {
            Via::Setpriv(p)
        } else if let Some(p) = in_path("runuser") {
            Via::Runuser(p)
        } else {
            bail!(
                "the tests run as root and neither setpriv nor runuser is there to drop to `{PG_USER}`"
            );
        };
        Ok(Self::User { uid, gid, via })
    }

    /// A command running `program` as this user, in `cwd`.
    fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut cmd = match self {
            Self::Me => Command::new(program),
            Self::User {
                via: Via::Setpriv(setpriv),
                ..
            } => {
                // setpriv execs: the child is the program itself.
                let mut c = Command::new(setpriv);
                c.args([
                    &format!("--reuid={PG_USER}"),
                    &format!("--regid={PG_USER}"),
                    "--init-groups",
                    "--",
                ])
                .arg(program);
                c
            }
            Self::User {
                via: Via::Runuser(runuser),
                ..
            } => {
                let mut c = Command::new(runuser);
                c.args(["-u", PG_USER, "--"]).arg(program);
                c
            }
        };
        cmd.current_dir(cwd);
        cmd
    }

    /// Makes `path` the user's.
    fn give(&self, path: &Path) -> anyhow::Result<()> {
        if let Self::User { uid, gid, .. } = self {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                .with_context(|| format!("cannot give {} to user {PG_USER}", path.display()))?;
        }
        Ok(())
    }

    /// A hint for errors that may come from the user not reaching the temp dir.
    fn hint(&self, dir: &Path) -> String {
        match self {
            Self::Me => String::new(),
            Self::User { .. } => format!(
                " (it runs as user {PG_USER}, who must be able to reach {}: if TMPDIR is a private \
                 directory, set TMPDIR=/tmp)",
                dir.display()
            ),
        }
    }
}

/// Whether this process's effective user is root (Linux: `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port that was free a moment ago (the caller retries if the server cannot bind it).
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// The end of the server's log.
fn log_tail(log: &Path) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
