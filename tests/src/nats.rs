//! A real nats-server with JetStream for one test: free loopback port, temp store dir, readiness
//! taken from its own log line, stop and restart on the same port and store, killed on drop.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long nats-server may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The nats-server binary: `$NATS_SERVER_BIN`, else the project's pinned one in `.tools/`.
pub fn server_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let pinned = crate::workspace().join(".tools/venv/bin/nats-server");
    if pinned.exists() {
        return Ok(pinned);
    }
    bail!(
        "no nats-server: run `make tools` (installs the pinned nats-server into .tools/) or set NATS_SERVER_BIN"
    )
}

pub struct NatsServer {
    child: Option<Child>,
    store: tempfile::TempDir,
    port: u16,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts a server whose `max_payload` is `bytes` (set by a config file: there is no flag).
    pub async fn start_with_max_payload(bytes: usize) -> anyhow::Result<Self> {
        let conf = tempfile::Builder::new().suffix(".conf").tempfile()?;
        std::fs::write(conf.path(), format!("max_payload: {bytes}\n"))?;
        let (_, path) = conf.keep()?;
        let path = path.to_string_lossy().into_owned();
        Self::start_with(&["-c", &path]).await
    }

    /// Starts a server with extra command-line arguments (e.g. `--auth`).
    pub async fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        let store = tempfile::tempdir()?;
        let mut server = Self {
            child: None,
            store,
            port: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn(-1).await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs (the benchmark reads its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Stops the server (SIGKILL: the harshest stop; file storage keeps what was acknowledged).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts it again on the same port with the same store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let port = i32::from(self.port);
        self.spawn(port).await
    }

    async fn spawn(&mut self, port: i32) -> anyhow::Result<()> {
        let mut child = Command::new(server_bin()?)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(self.store.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start nats-server")?;
        let stderr = child.stderr.take().context("nats-server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = tokio::time::timeout(READY_TIMEOUT, async {
            let mut addr = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line.split("client connections on ").nth(1) {
                    addr = Some(a.trim().to_owned());
                }
                if line.contains("Server is ready") {
                    return addr.context("nats-server did not log its client address");
                }
            }
            bail!("nats-server exited before it was ready")
        })
        .await
        .context("nats-server not ready in time")??;
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("cannot read nats-server port")?;
        self.child = Some(child);
        Ok(())
    }

    /// A client of this server.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }
}
