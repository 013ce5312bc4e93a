//! Running the built `mend` binary: write its config, spawn it, read its log, wait for it to be
//! consuming, stop it gracefully or kill it, start it again.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The `mend` binary: `$MEND_BIN`, else the one cargo built next to this test executable.
pub fn mend_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MEND_BIN") {
        return Ok(PathBuf::from(p));
    }
    // Test executables live in target/<profile>/deps, other binaries in target/<profile>.
    let exe = std::env::current_exe()?;
    let candidates = exe.ancestors().skip(1).take(2).map(|dir| dir.join("mend"));
    let Some(bin) = candidates.into_iter().find(|p| p.exists()) else {
        bail!(
            "the mend binary is missing next to {}: run `cargo build --bin mend` first (make test does)",
            exe.display()
        );
    };
    Ok(bin)
}

/// A free loopback port for a listener of the process under test, never one this test process
/// handed out before: the port is only bound later by the process started with it, and the kernel
/// may offer a just-released port again (a sidecar and a processor of one test once got the same).
pub fn free_port() -> u16 {
    use std::hash::BuildHasher as _;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Below the kernel's ephemeral range (32768-60999 by default): a port the kernel handed out
    // for `:0` is soon handed out again to another process's connection or listener (another
    // test's), which then takes it before the process it was meant for binds it. Here only
    // another test's pick can collide, at random among 12,000.
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u64..2000 {
        let port = 20_000 + (random.hash_one((std::process::id(), attempt)) % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port == 0 || !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// One `mend` process (any role) and everything it logged.
pub struct MendProcess {
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    changed: watch::Sender<usize>,
    _dir: Option<tempfile::TempDir>,
}

impl MendProcess {
    /// Writes `config` to a temp file and runs `mend <role> --config <file>`.
    pub async fn start(role: &str, config: &str) -> anyhow::Result<Self> {
        Self::start_with_env(role, config, &[]).await
    }

    pub async fn start_with_env(
        role: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_with_args(role, config, &[], env).await
    }

    /// Runs `mend <role> --config <file> <args…>` with `env` added to the environment.
    pub async fn start_with_args(
        role: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(format!("{role}.toml"));
        std::fs::write(&path, config)?;
        let path = path.display().to_string();
        let all: Vec<&str> = [role, "--config", &path]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        Self::spawned(&all, env, Some(dir))
    }

    /// Runs `mend <args…>` (a role without a config file, such as `mend dev`) with `env` added.
    pub fn run(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawned(args, env, None)
    }

    fn spawned(
        args: &[&str],
        env: &[(&str, &str)],
        dir: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            changed: watch::channel(0).0,
            _dir: dir,
        };
        p.spawn()?;
        Ok(p)
    }

    /// Sends `signal` (a `kill` name such as `INT`) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("not running")?;
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(mend_bin()?);
        cmd.args(&self.args)
            .env(
                "MEND_LOG",
                std::env::var("MEND_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("MEND_NATS_URL")
            // Traces only where a test asks for them (its `env`), never from the caller's shell.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("cannot start mend")?;
        for pipe in [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = self.log.clone();
            let changed = self.changed.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("MEND_TEST_ECHO").is_some() {
                        eprintln!("[mend] {line}");
                    }
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.push(line);
                        log.len()
                    };
                    changed.send_replace(n);
                }
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Everything logged so far, one line each.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `text`.
    pub async fn wait_log(&self, text: &str, limit: Duration) -> anyhow::Result<()> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.log.lock().unwrap().iter().any(|l| l.contains(text)) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                bail!(
                    "timed out waiting for mend to log {text:?}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Waits until the sidecar (or processor) consumes, or the dashboard serves.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let text = match self.args.first().map(String::as_str) {
            Some("processor") => "Processor consuming",
            Some("dashboard") => "Dashboard serving",
            _ => "Sidecar consuming",
        };
        self.wait_log(text, Duration::from_secs(30)).await
    }

    /// SIGKILL, no chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM (unless it already exited, e.g. after a Ctrl-C to its process group), then waits
    /// for the exit.
    pub async fn terminate(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let child = self.child.as_mut().context("not running")?;
        if child.try_wait()?.is_none() {
            let pid = child.id().context("no pid")?;
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
        }
        self.wait_exit(limit).await
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let child = self.child.as_mut().context("not running")?;
        let status = tokio::time::timeout(limit, child.wait())
            .await
            .with_context(|| {
                format!("mend did not exit within {limit:?}; log:\n{}", self.log())
            })??;
        self.child = None;
        // Let the log readers catch the last lines.
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            let mut rx = self.changed.subscribe();
            while tokio::time::timeout(Duration::from_millis(50), rx.changed())
                .await
                .is_ok()
            {}
        })
        .await;
        Ok(status)
    }

    /// Starts the same command again (after a kill or an exit).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.log.lock().unwrap().push("---- restart ----".into());
        self.spawn()
    }
}

/// Adds top-level keys or tables (such as `[nats]`) to a config written by [`sidecar_config`].
pub fn with_top_level(config: &str, toml: &str) -> String {
    SidecarToml::parse(config).top_keys(toml).to_string()
}

/// A `sidecar.toml` as data: built, changed and written out by the harness, never patched as text.
#[derive(Debug, Clone)]
pub struct SidecarToml(toml::Table);

impl SidecarToml {
    /// `service` on `nats_url`, its ops endpoint on a free port, no binding yet.
    pub fn new(service: &str, nats_url: &str) -> Self {
        let mut top = toml::Table::new();
        top.insert("service".into(), service.into());
        top.insert("nats_url".into(), nats_url.into());
        top.insert("listen".into(), format!("127.0.0.1:{}", free_port()).into());
        top.insert("shutdown_timeout".into(), "10s".into());
        Self(top)
    }

    /// Reads a config this harness wrote.
    pub fn parse(text: &str) -> Self {
        Self(
            text.parse()
                .unwrap_or_else(|e| panic!("not TOML ({e}):\n{text}")),
        )
    }

    /// Adds a binding of `stream` on `subjects`, delivered to `endpoint`.
    pub fn binding(mut self, name: &str, stream: &str, subjects: &[&str], endpoint: &str) -> Self {
        let mut b = toml::Table::new();
        b.insert("name".into(), name.into());
        b.insert("stream".into(), stream.into());
        let subjects: Vec<toml::Value> = subjects.iter().map(|s| (*s).into()).collect();
        b.insert("subjects".into(), subjects.into());
        b.insert("endpoint".into(), endpoint.into());
        self.bindings().push(b.into());
        self
    }

    /// Keys of a TOML fragment set on the last binding (a `[nats]` table in it goes to the top).
    pub fn binding_keys(mut self, toml: &str) -> Self {
        let mut keys = Self::parse(toml).0;
        if let Some(nats) = keys.remove("nats") {
            let mut top = toml::Table::new();
            top.insert("nats".into(), nats);
            merge(&mut self.0, top);
        }
        if let Some(toml::Value::Table(last)) = self.bindings().last_mut() {
            merge(last, keys);
        }
        self
    }

    /// Keys and tables of a TOML fragment set at the top level (tables merged key by key).
    pub fn top_keys(mut self, toml: &str) -> Self {
        merge(&mut self.0, Self::parse(toml).0);
        self
    }

    /// Sets one top-level key.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    fn bindings(&mut self) -> &mut Vec<toml::Value> {
        let entry = self
            .0
            .entry("binding")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        match entry {
            toml::Value::Array(a) => a,
            _ => panic!("`binding` is not an array of tables"),
        }
    }
}

impl std::fmt::Display for SidecarToml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Sets every key of `more` in `into`, merging tables key by key.
fn merge(into: &mut toml::Table, more: toml::Table) {
    for (k, v) in more {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Runs `mend sidecar` with `config` and `env` when it is expected to refuse to start; returns its
/// exit code and its log.
pub async fn refused(config: &str, env: &[(&str, &str)]) -> anyhow::Result<(Option<i32>, String)> {
    let mut p = MendProcess::start_with_env("sidecar", config, env).await?;
    let status = p.wait_exit(Duration::from_secs(30)).await?;
    Ok((status.code(), p.log()))
}

/// `GET /readyz` of the process run with `config` (written by [`sidecar_config`]): status and body.
pub async fn readyz(config: &str) -> anyhow::Result<(u16, String)> {
    let r = reqwest::get(format!("http://{}/readyz", listen_addr(config))).await?;
    Ok((r.status().as_u16(), r.text().await?))
}

/// The `listen` address of a config written by [`sidecar_config`].
/// The value of the first series of metric `name` with labels `service` and `binding` = `svc`, from
/// the /metrics of the sidecar running `config`.
pub async fn metric(config: &str, svc: &str, name: &str) -> anyhow::Result<Option<f64>> {
    let text = reqwest::get(format!("http://{}/metrics", listen_addr(config)))
        .await?
        .text()
        .await?;
    let prefix = format!("{name}{{service=\"{svc}\",binding=\"{svc}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok()))
}

pub fn listen_addr(config: &str) -> String {
    config
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned()
}

/// A sidecar config for one binding to `endpoint`, with test-friendly timings; the keys of `extra`
/// (TOML) are set on the binding.
pub fn sidecar_config(
    service: &str,
    nats_url: &str,
    stream: &str,
    subjects: &[&str],
    endpoint: &str,
    extra: &str,
) -> String {
    SidecarToml::new(service, nats_url)
        .binding(service, stream, subjects, endpoint)
        .binding_keys(extra)
        .to_string()
}

/// A processor config using the rules at `rules` (a file or directory), plus `extra` top-level keys.
pub fn processor_config(nats_url: &str, rules: &std::path::Path, extra: &str) -> String {
    format!(
        "nats_url = \"{nats_url}\"\nrules = {:?}\nlisten = \"127.0.0.1:{}\"\nshutdown_timeout = \"10s\"\n{extra}\n",
        rules.display().to_string(),
        free_port()
    )
}

/// The example rules shipped in the repository.
pub fn example_rules() -> PathBuf {
    crate::workspace().join("examples/rules")
}
