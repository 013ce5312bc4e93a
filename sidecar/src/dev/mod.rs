//! `mend dev` (SPEC §1): everything on one machine for trying mend. A nats-server child (unless
//! `--nats-url`), the demo orders app ([`demo`]) behind a sidecar, the processor with the example
//! rules, the dashboard on SQLite open without login, and a producer. The roles run in this
//! process exactly as `mend sidecar`, `mend processor` and `mend dashboard` would, from config
//! files written into the data folder (so they double as examples). Prints the dashboard's URL and
//! a status line every few seconds; SIGINT or SIGTERM stops the producer, then the roles, then
//! nats-server, and removes the temporary folder.

pub mod demo;
pub mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::RunError;
use crate::common::config::NatsConfig;
use crate::dashboard::Access;
use crate::dashboard::config::DashboardConfig;
use crate::processor::config::ProcessorConfig;
use crate::runtime::config::SidecarConfig;
use demo::{DemoApp, SERVICE, STREAM, SUBJECTS};
use server::NatsChild;

/// The example rules shipped with mend, used by the processor and for dry-runs.
const EXAMPLE_RULES: &str = include_str!("../../../examples/rules/orders.toml");
/// How long the dashboard may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the roles may take to stop gracefully.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// The options of `mend dev`.
#[derive(Debug, Clone)]
pub struct Options {
    /// A running NATS server to use instead of starting one.
    pub nats_url: Option<String>,
    /// The nats-server binary to start.
    pub nats_server: Option<PathBuf>,
    /// Where the dashboard listens.
    pub listen: SocketAddr,
    /// Events per second from the producer (0: no producer).
    pub rate: u32,
    /// A folder kept after exit for NATS' store, the database, the configs and the rules.
    pub data: Option<PathBuf>,
    /// Between status lines.
    pub status_every: Duration,
    /// Bulk delivery to the demo app, this many events per batch (None: one per request).
    pub batch: Option<usize>,
}

/// The data folder: a kept one, or a temporary one removed on exit.
enum Data {
    Kept(PathBuf),
    Temp(tempfile::TempDir),
}

impl Data {
    fn path(&self) -> &Path {
        match self {
            Data::Kept(p) => p,
            Data::Temp(t) => t.path(),
        }
    }
}

/// Runs everything until `shutdown`.
pub async fn run(opts: Options, shutdown: CancellationToken) -> Result<(), RunError> {
    let data = match &opts.data {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the data folder {}", dir.display()))
                .map_err(RunError::Config)?;
            Data::Kept(std::path::absolute(dir).unwrap_or_else(|_| dir.clone()))
        }
        None => Data::Temp(
            tempfile::Builder::new()
                .prefix("mend-dev-")
                .tempdir()
                .context("cannot create a temporary folder")
                .map_err(RunError::Startup)?,
        ),
    };
    let dir = data.path().to_path_buf();
    write_rules(&dir).map_err(RunError::Config)?;

    // NATS: the one given, or a child started here, on this thread (see server::die_with_parent).
    let (mut child, url) = match &opts.nats_url {
        Some(url) => (None, url.clone()),
        None => {
            let (bin, version) =
                server::find(opts.nats_server.as_deref()).map_err(RunError::Startup)?;
            let store = dir.join("nats");
            let child = NatsChild::start(&bin, &store)
                .await
                .map_err(RunError::Startup)?;
            println!(
                "nats-server {version} ({}) at {}, storing in {}",
                bin.display(),
                child.url(),
                store.display()
            );
            let url = child.url().to_owned();
            (Some(child), url)
        }
    };
    let result = run_with(&opts, &dir, &url, &mut child, shutdown).await;
    if let Some(c) = child
        && let Err(e) = c.stop().await
    {
        tracing::warn!(error = %e, "Could not stop nats-server.");
    }
    match &data {
        Data::Temp(t) => println!("Stopped; removed {}.", t.path().display()),
        Data::Kept(p) => println!("Stopped; everything is kept in {}.", p.display()),
    }
    drop(data);
    result
}

/// Everything after NATS is up; the caller stops nats-server whatever happens here.
async fn run_with(
    opts: &Options,
    dir: &Path,
    url: &str,
    child: &mut Option<NatsChild>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (_client, js, _) = match crate::common::nats::start(
        url,
        &NatsConfig::default(),
        "mend-dev",
        &shutdown,
    )
    .await
    {
        Ok(started) => started,
        Err(crate::common::nats::ConnectError::Stopped) => return Ok(()),
        Err(e) => return Err(RunError::Startup(e.into())),
    };
    demo_stream(&js).await.map_err(RunError::Startup)?;
    let app = DemoApp::start().await.map_err(RunError::Startup)?;
    let configs = write_configs(
        dir,
        url,
        &app.endpoint(opts.batch.is_some()),
        opts.batch,
        opts.listen,
    )
    .map_err(RunError::Config)?;

    let roles_stop = CancellationToken::new();
    let mut roles: JoinSet<(&'static str, Result<(), RunError>)> = JoinSet::new();
    roles.spawn(named(
        "processor",
        crate::processor::run(configs.processor, roles_stop.clone()),
    ));
    roles.spawn(named(
        "sidecar",
        crate::runtime::run(configs.sidecar, roles_stop.clone()),
    ));
    roles.spawn(named(
        "dashboard",
        crate::dashboard::run(configs.dashboard, Access::Open, roles_stop.clone()),
    ));

    let base = format!("http://{}", opts.listen);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("cannot make an HTTP client")
        .map_err(RunError::Startup)?;
    let producer_stop = CancellationToken::new();
    let mut producer = None;
    let outcome: Result<(), RunError> = async {
        tokio::select! {
            r = wait_ready(&http, &base) => r.map_err(RunError::Startup)?,
            Some(ended) = roles.join_next() => return Err(role_ended(ended)),
            _ = shutdown.cancelled() => return Ok(()),
        }
        println!();
        println!("mend dev is running. Dashboard: {base}/");
        println!(
            "  The demo orders app is at {}; the configs and rules in use are in {}",
            app.endpoint(opts.batch.is_some()),
            dir.display()
        );
        println!(
            "  (edit rules/orders.toml there and the processor reloads it). New accounts open {}s \
             after their first order: resubmit a parked order from the dashboard after that, and the \
             orders held behind it follow in order.",
            demo::ACCOUNT_OPENS_AFTER.as_secs()
        );
        if !opts.listen.ip().is_loopback() {
            println!(
                "  WARNING: the dashboard has no login under mend dev and listens on {}: anyone who \
                 can reach it can resubmit and discard.",
                opts.listen
            );
        }
        println!("  Ctrl-C stops everything.\n");
        producer = Some(tokio::spawn(demo::produce(
            js.clone(),
            opts.rate,
            producer_stop.clone(),
        )));
        let mut every = tokio::time::interval(opts.status_every);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => println!("{}", status_line(&http, &base, &app.stats).await),
                Some(ended) = roles.join_next() => return Err(role_ended(ended)),
                status = exited(child) => {
                    return Err(RunError::Runtime(anyhow::anyhow!("nats-server exited ({status})")));
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
    .await;

    println!("\nStopping: the producer, then the sidecar, processor and dashboard, then NATS.");
    producer_stop.cancel();
    if let Some(p) = producer {
        let _ = p.await;
    }
    roles_stop.cancel();
    let stopped = tokio::time::timeout(STOP_TIMEOUT, async {
        let mut failed = None;
        while let Some(ended) = roles.join_next().await {
            match ended {
                Ok((_, Ok(()))) => {}
                other => failed = Some(role_ended(other)),
            }
        }
        failed
    })
    .await;
    app.stop().await;
    match (outcome, stopped) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(None)) => Ok(()),
        (Ok(()), Ok(Some(e))) => Err(e),
        (Ok(()), Err(_)) => Err(RunError::Runtime(anyhow::anyhow!(
            "the roles did not stop within {}s",
            STOP_TIMEOUT.as_secs()
        ))),
    }
}

async fn named(
    role: &'static str,
    run: impl Future<Output = Result<(), RunError>>,
) -> (&'static str, Result<(), RunError>) {
    (role, run.await)
}

/// What a role that ended (before it was asked to) means for `mend dev`.
fn role_ended(
    ended: Result<(&'static str, Result<(), RunError>), tokio::task::JoinError>,
) -> RunError {
    match ended {
        Ok((role, Ok(()))) => RunError::Runtime(anyhow::anyhow!("the {role} stopped")),
        Ok((role, Err(RunError::Config(e)))) => {
            RunError::Config(anyhow::anyhow!("the {role}: {e:#}"))
        }
        Ok((role, Err(RunError::Startup(e)))) => {
            RunError::Startup(anyhow::anyhow!("the {role} cannot start: {e:#}"))
        }
        Ok((role, Err(RunError::Runtime(e)))) => {
            RunError::Runtime(anyhow::anyhow!("the {role} failed: {e:#}"))
        }
        Err(e) => RunError::Runtime(anyhow::anyhow!("a role panicked: {e}")),
    }
}

/// Resolves when the child exits; never without a child.
async fn exited(child: &mut Option<NatsChild>) -> String {
    match child {
        Some(c) => c.exited().await,
        None => std::future::pending().await,
    }
}

/// The demo app's own stream (as its owner would create it); an existing one must take its
/// subjects.
async fn demo_stream(js: &jetstream::Context) -> anyhow::Result<()> {
    match js.get_stream(STREAM).await {
        Ok(mut s) => {
            let info = s.info().await?;
            if !info.config.subjects.iter().any(|x| x == SUBJECTS) {
                anyhow::bail!(
                    "this NATS server already has a stream {STREAM} with subjects {:?}; the demo \
                     needs one with {SUBJECTS:?} (use another server, or delete that stream)",
                    info.config.subjects
                );
            }
            Ok(())
        }
        Err(_) => {
            js.create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![SUBJECTS.into()],
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(24 * 3600),
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create the demo stream {STREAM}"))?;
            Ok(())
        }
    }
}

/// Writes the example rules into `dir/rules/` unless they are there (kept data folders keep
/// edited rules).
fn write_rules(dir: &Path) -> anyhow::Result<()> {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules)
        .with_context(|| format!("cannot create {}", rules.display()))?;
    let file = rules.join("orders.toml");
    if !file.exists() {
        std::fs::write(&file, EXAMPLE_RULES)
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(())
}

struct Configs {
    sidecar: SidecarConfig,
    processor: ProcessorConfig,
    dashboard: DashboardConfig,
}

/// A TOML string literal.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Writes the three roles' configs into `dir` and loads them as `mend` would (without `MEND_*`
/// overrides: the demo is the same wherever it runs).
fn write_configs(
    dir: &Path,
    nats_url: &str,
    endpoint: &str,
    batch: Option<usize>,
    listen: SocketAddr,
) -> anyhow::Result<Configs> {
    let url = quoted(nats_url);
    let sidecar = format!(
        "# The sidecar of `mend dev`: the demo app's stream {STREAM}, delivered to the demo app, in order per account.\n\
         service  = {service}\n\
         nats_url = {url}\n\
         listen   = \"127.0.0.1:0\"\n\n\
         [[binding]]\n\
         name        = \"orders\"\n\
         stream      = {stream}\n\
         subjects    = [{subjects}]\n\
         key         = {{ json = \"/account\" }}\n\
         endpoint    = {endpoint}\n\
         concurrency = 32\n\
         timeout     = \"5s\"\n{batch}",
        batch = batch.map_or(String::new(), |n| format!(
            "batch       = {{ max_messages = {n}, max_wait = \"2ms\" }}\n"
        )),
        service = quoted(SERVICE),
        stream = quoted(STREAM),
        subjects = quoted(SUBJECTS),
        endpoint = quoted(endpoint),
    );
    let processor = format!(
        "# The processor of `mend dev`: the example rules.\n\
         nats_url    = {url}\n\
         rules       = \"rules/\"\n\
         max_repairs = 3\n\
         listen      = \"127.0.0.1:0\"\n"
    );
    let db = dir.join("mend.db");
    let dashboard = format!(
        "# The dashboard of `mend dev`: SQLite, and no [[user]]: under `mend dev` it is open to anyone\n\
         # who can reach it (`mend dashboard` refuses to run without a user or a token).\n\
         nats_url     = {url}\n\
         database_url = {db}\n\
         listen       = {listen}\n\
         rules        = \"rules/\"\n",
        db = quoted(&format!("sqlite://{}", db.display())),
        listen = quoted(&listen.to_string()),
    );
    let none = std::iter::empty::<(String, String)>;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    };
    Ok(Configs {
        sidecar: SidecarConfig::load(&write("sidecar.toml", &sidecar)?, none())?,
        processor: ProcessorConfig::load(&write("processor.toml", &processor)?, none())?,
        dashboard: DashboardConfig::load(&write("dashboard.toml", &dashboard)?, none())?,
    })
}

/// Waits until the dashboard answers `/readyz` with 200.
async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the dashboard at {base} was not ready within {}s",
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One line: what the app processed (from the app), what is parked and held (from the dashboard).
async fn status_line(http: &reqwest::Client, base: &str, stats: &demo::Stats) -> String {
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let time = at.get(11..19).unwrap_or(&at);
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut line = format!(
        "{time}  delivered {} (repaired {}, resubmitted {})  503s retried {}",
        n(&stats.delivered),
        n(&stats.repaired),
        n(&stats.resubmitted),
        n(&stats.unavailable),
    );
    match overview(http, base).await {
        Ok(o) => {
            let parked: i64 = o["counts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["status"] == "parked")
                .filter_map(|c| c["count"].as_i64())
                .sum();
            line.push_str(&format!(
                "  parked {parked}  held {} on {} keys",
                o["held_messages"].as_u64().unwrap_or(0),
                o["held_keys"].as_u64().unwrap_or(0)
            ));
        }
        Err(e) => line.push_str(&format!("  (dashboard: {e:#})")),
    }
    let disorder = n(&stats.out_of_order);
    if disorder > 0 {
        line.push_str(&format!("  OUT OF ORDER {disorder}"));
    }
    let duplicates = n(&stats.duplicates);
    if duplicates > 0 {
        line.push_str(&format!("  duplicates {duplicates}"));
    }
    line
}

async fn overview(http: &reqwest::Client, base: &str) -> anyhow::Result<Value> {
    let r = http.get(format!("{base}/api/overview")).send().await?;
    let status = r.status();
    let body = r.bytes().await?;
    anyhow::ensure!(status.is_success(), "{status}");
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_configs_load_and_say_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        write_rules(dir.path()).unwrap();
        let c = write_configs(
            dir.path(),
            "nats://127.0.0.1:4333",
            "http://127.0.0.1:5555/events",
            None,
            "127.0.0.1:8099".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(c.sidecar.bindings[0].batch, None);
        let batched = write_configs(
            dir.path(),
            "nats://127.0.0.1:4333",
            "http://127.0.0.1:5555/events/batch",
            Some(50),
            "127.0.0.1:8099".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(batched.sidecar.bindings[0].batch.unwrap().max_messages, 50);
        assert_eq!(c.sidecar.service, SERVICE);
        assert_eq!(c.sidecar.bindings[0].stream, STREAM);
        assert_eq!(c.processor.rules, dir.path().join("rules/"));
        assert!(!c.dashboard.has_credentials());
        assert_eq!(
            c.dashboard.database_url,
            format!("sqlite://{}", dir.path().join("mend.db").display())
        );
        let rules = repair_rules::rules::RuleSet::parse([("orders.toml", EXAMPLE_RULES)]);
        assert!(rules.is_ok(), "{rules:?}");
    }

    #[test]
    fn kept_rules_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/orders.toml"), "# mine\n").unwrap();
        write_rules(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("rules/orders.toml")).unwrap(),
            "# mine\n"
        );
    }
}
