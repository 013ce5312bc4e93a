//! A three-node nats-server cluster with JetStream for one test: free loopback ports, one temp
//! store per node, ready when every node says so and JetStream has a meta leader whose peers are
//! all current; nodes can be killed, restarted on the same ports and store, paused and resumed;
//! all three are killed on drop.
//!
//! Node `i` is named `n<i>`; nats-server reports stream and meta leaders by these names, so
//! [`Cluster::leader_index`] maps a leader back to its node. Each node runs
//!
//! ```text
//! nats-server -a 127.0.0.1 -p <client port> -n n<i> --cluster_name mend-<unique>
//!   --cluster nats://127.0.0.1:<cluster port> --routes <the other two cluster urls>
//!   -js -sd <own temp dir> -m -1
//! ```
//!
//! The client and cluster ports are picked up front (the routes must be known before any node
//! starts); if another process takes one in the short window before the node binds it, the whole
//! start is retried with new ports. The monitoring port (`-m -1`, read from the log) serves `/jsz`
//! (meta leader, a node's own copy of a stream) and `/healthz` (a restarted node has caught up).
//!
//! Observed with nats-server 2.15.1: a node logs "Server is ready" *before* it binds its route
//! port, so a node counts as started only once it also logs "Listening for route connections"
//! (a taken route port is a fatal error logged after "ready"). Without a meta leader (at start,
//! or on a restarted node until it has contact) JetStream API requests go unanswered (no "no
//! responders"): they end at the client's timeout, so the harness asks `/jsz` first. Publishing
//! while a stream elects a leader (≈ 4–7 s after its leader is killed) fails with "no responders"
//! (async-nats says "no stream found for given subject") or an ack timeout: publish with a
//! `Nats-Msg-Id` and retry with the same id ([`publish_until_stored`]). A client connected to a
//! paused node gets no error, only timeouts, until its pings go unanswered.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::ServerAddr;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::nats::server_bin;
use crate::wait;

/// Nodes in a cluster.
pub const NODES: usize = 3;
/// How long one node may take to log that it is ready and listens for routes.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the cluster may take to elect a JetStream meta leader (at start) or a restarted node
/// to rejoin.
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Cluster::stream_leader`] and [`Cluster::meta_leader`] wait for a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one JetStream API request or monitoring request made by the harness.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Whole-cluster start attempts when a picked port was taken before a node could bind it.
const START_ATTEMPTS: usize = 4;
/// Log lines kept per node.
const LOG_LINES: usize = 200;

/// A three-node cluster. Dropping it kills every node (SIGKILL, also when paused).
pub struct Cluster {
    name: String,
    nodes: Vec<Node>,
    http: reqwest::Client,
}

/// One nats-server of a [`Cluster`].
pub struct Node {
    index: usize,
    name: String,
    client_port: u16,
    cluster_port: u16,
    args: Vec<String>,
    store: tempfile::TempDir,
    child: Option<Child>,
    paused: bool,
    /// The last [`LOG_LINES`] lines of stdout and stderr, over all runs.
    log: Arc<Mutex<VecDeque<String>>>,
    /// What the current run has logged about its start.
    boot: watch::Receiver<Boot>,
}

/// What a node's current run has said about its start, from its log.
#[derive(Clone, Debug, Default)]
struct Boot {
    /// "Server is ready" (client port bound).
    ready: bool,
    /// "Listening for route connections" (cluster port bound; logged after "ready").
    routes: bool,
    /// The monitoring port (`-m -1`).
    monitor: Option<u16>,
    /// The first fatal (`[FTL]`) line.
    fatal: Option<String>,
    /// Its stderr closed: the process is gone.
    exited: bool,
}

impl Boot {
    fn started(&self) -> bool {
        self.ready && self.routes && self.monitor.is_some()
    }

    fn settled(&self) -> bool {
        self.started() || self.fatal.is_some() || self.exited
    }

    fn port_taken(&self) -> bool {
        self.fatal
            .as_deref()
            .is_some_and(|l| l.contains("address already in use"))
    }
}

impl Cluster {
    /// Starts three nodes on free loopback ports and waits until all are ready and JetStream has
    /// a meta leader with every peer current (up to 60 s). Retries the whole start with new ports
    /// if a picked port was taken by someone else before a node bound it.
    pub async fn start() -> anyhow::Result<Self> {
        crate::init();
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build an HTTP client")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let n = STARTED.fetch_add(1, Ordering::Relaxed);
            let name = format!("mend-{}-{n}", std::process::id());
            let ports = free_ports(2 * NODES)?;
            let (client_ports, cluster_ports) = ports.split_at(NODES);
            let mut cluster = Self {
                name,
                nodes: Vec::with_capacity(NODES),
                http: http.clone(),
            };
            for (i, &port) in client_ports.iter().enumerate() {
                let node = Node::new(i, &cluster.name, port, cluster_ports)?;
                cluster.nodes.push(node);
            }
            for node in &mut cluster.nodes {
                node.spawn()?;
            }
            let started =
                futures::future::join_all(cluster.nodes.iter().map(Node::wait_started)).await;
            if let Some(e) = started.into_iter().find_map(Result::err) {
                if attempt < START_ATTEMPTS && cluster.nodes.iter().any(Node::port_taken) {
                    tracing::info!("a picked port was taken, starting the cluster again: {e:#}");
                    continue; // `cluster` is dropped: its nodes are killed
                }
                return Err(e.context(format!(
                    "cluster did not start (attempt {attempt}); logs:\n{}",
                    cluster.logs()
                )));
            }
            cluster
                .wait_jetstream(JETSTREAM_TIMEOUT)
                .await
                .with_context(|| format!("JetStream not ready; logs:\n{}", cluster.logs()))?;
            return Ok(cluster);
        }
    }

    /// The cluster's name (`--cluster_name`), unique per cluster.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Node `i` (`n<i>`).
    ///
    /// # Panics
    /// If `i` is not below [`NODES`] (a bug in the test).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// All nodes, `n0` first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The three client URLs, `n0` first.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// The client URLs as one comma-separated seed list (the form mend's config takes).
    pub fn seed_list(&self) -> String {
        self.urls().join(",")
    }

    /// The client URLs parsed for `async_nats::connect` (it refuses a comma-separated string).
    pub fn server_addrs(&self) -> anyhow::Result<Vec<ServerAddr>> {
        self.nodes.iter().map(Node::server_addr).collect()
    }

    /// A client that may use any node (reconnects to another one when its node dies).
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::connect(self.server_addrs()?)
            .await
            .with_context(|| format!("cannot connect to cluster {}", self.seed_list()))
    }

    /// A client connected to node `i` only (it ignores the servers the cluster tells it about).
    pub async fn node_client(&self, i: usize) -> anyhow::Result<async_nats::Client> {
        self.node_checked(i)?.client().await
    }

    /// SIGKILLs node `i` and waits for it to exit (its store stays for [`Cluster::restart`]).
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.node_checked_mut(i)?.kill().await
    }

    /// Starts node `i` again with the same ports, store and arguments (killing it first if it
    /// still runs), and waits until it logs that it is ready and has rejoined: a client connected
    /// only to it gets an answer from `$JS.API.INFO` and its `/healthz` says its JetStream is
    /// current (meta and stream state caught up).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let http = self.http.clone();
        let node = self.node_checked_mut(i)?;
        node.kill().await?;
        node.push_log(format!("---- {} restart ----", node.name));
        node.spawn()?;
        let rejoined = async {
            node.wait_started().await?;
            node.wait_rejoined(&http, JETSTREAM_TIMEOUT).await
        }
        .await;
        rejoined.with_context(|| format!("n{i} did not rejoin; logs:\n{}", self.logs()))
    }

    /// Stops node `i` with SIGSTOP: it keeps its connections but answers nothing (a hung node).
    pub async fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.node_checked_mut(i)?;
        node.signal("STOP").await?;
        node.paused = true;
        Ok(())
    }

    /// Lets a paused node `i` run again (SIGCONT).
    pub async fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.node_checked_mut(i)?;
        node.signal("CONT").await?;
        node.paused = false;
        Ok(())
    }

    /// `$JS.API.STREAM.INFO.<stream>` as JSON, asked through a node that runs (one request; an
    /// answer with an `error` is an error).
    pub async fn stream_info(&self, stream: &str) -> anyhow::Result<Value> {
        let client = self.live_client().await?;
        api(&client, &format!("$JS.API.STREAM.INFO.{stream}")).await
    }

    /// The name (`n<i>`) of `stream`'s leader, from `cluster.leader` of its stream info. Waits (up
    /// to 30 s) while the stream has no leader, e.g. during an election. A KV bucket `b` is the
    /// stream `KV_b`.
    pub async fn stream_leader(&self, stream: &str) -> anyhow::Result<String> {
        wait::until(
            &format!("a leader of stream {stream}"),
            LEADER_TIMEOUT,
            || async {
                let info = self.stream_info(stream).await?;
                Ok(non_empty_str(&info, "/cluster/leader"))
            },
        )
        .await
    }

    /// The index of `stream`'s leader (see [`Cluster::stream_leader`]).
    pub async fn leader_index(&self, stream: &str) -> anyhow::Result<usize> {
        let leader = self.stream_leader(stream).await?;
        self.index_of(&leader)
    }

    /// The indexes of `stream`'s followers as its leader reports them (`cluster.replicas`).
    pub async fn follower_indexes(&self, stream: &str) -> anyhow::Result<Vec<usize>> {
        let info = wait::until(
            &format!("a leader of stream {stream}"),
            LEADER_TIMEOUT,
            || async {
                let info = self.stream_info(stream).await?;
                Ok(non_empty_str(&info, "/cluster/leader").map(|_| info))
            },
        )
        .await?;
        let replicas = info
            .pointer("/cluster/replicas")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        replicas
            .iter()
            .filter_map(|r| r.get("name").and_then(Value::as_str))
            .map(|name| self.index_of(name))
            .collect()
    }

    /// Finds `stream`'s leader and SIGKILLs it; returns its index (restart it with
    /// [`Cluster::restart`]).
    pub async fn kill_leader_of(&mut self, stream: &str) -> anyhow::Result<usize> {
        let i = self.leader_index(stream).await?;
        self.kill(i).await?;
        Ok(i)
    }

    /// The name (`n<i>`) of the JetStream meta leader, from `/jsz` of a node that runs. Waits (up
    /// to 30 s) while there is none.
    pub async fn meta_leader(&self) -> anyhow::Result<String> {
        wait::until("a JetStream meta leader", LEADER_TIMEOUT, || async {
            Ok(self.meta_cluster().await?.and_then(|m| m.leader))
        })
        .await
    }

    /// The index of the JetStream meta leader (see [`Cluster::meta_leader`]).
    pub async fn meta_leader_index(&self) -> anyhow::Result<usize> {
        let leader = self.meta_leader().await?;
        self.index_of(&leader)
    }

    /// The index of node `n<i>`.
    pub fn index_of(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node named {name:?} in cluster {}", self.name))
    }

    /// The last lines (up to 200) each node logged, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(Node::log_section).collect()
    }

    /// Waits until the meta leader sees every peer as current (so R3 assets can be placed at once)
    /// and `$JS.API.INFO` answers without an error. The monitoring endpoint is asked first: without
    /// a meta leader, nats-server leaves JetStream API requests unanswered (no "no responders"),
    /// so a request would only end at its timeout.
    async fn wait_jetstream(&self, limit: Duration) -> anyhow::Result<()> {
        wait::until(
            "a JetStream meta leader with 3 current peers",
            limit,
            || async {
                let Some(leader) = self.meta_cluster().await?.and_then(|m| m.leader) else {
                    return Ok(None);
                };
                // The leader's own view: its peers and whether they keep up.
                let leader = self.index_of(&leader)?;
                let Some(view) = self.nodes[leader].meta_cluster(&self.http).await? else {
                    return Ok(None);
                };
                let settled = view.leader.as_deref() == Some(self.nodes[leader].name.as_str())
                    && view.cluster_size == Some(NODES as u64)
                    && view.replicas.len() == NODES - 1
                    && view.replicas.iter().all(|r| r.current);
                if !settled {
                    return Ok(None);
                }
                let client = self.live_client().await?;
                api(&client, "$JS.API.INFO").await?;
                Ok(Some(()))
            },
        )
        .await
    }

    /// `meta_cluster` of `/jsz` from the first node (that runs and is not paused) that knows a
    /// leader; `None` if the nodes that answer know none.
    async fn meta_cluster(&self) -> anyhow::Result<Option<MetaCluster>> {
        let mut answered = false;
        let mut last = None;
        for node in self.nodes.iter().filter(|n| n.is_live()) {
            match node.meta_cluster(&self.http).await {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => answered = true,
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) if !answered => Err(e),
            None if !answered => bail!("no node of {} runs", self.name),
            _ => Ok(None),
        }
    }

    /// A short-lived client of the nodes that run and are not paused, with short request timeouts.
    async fn live_client(&self) -> anyhow::Result<async_nats::Client> {
        let addrs = self
            .nodes
            .iter()
            .filter(|n| n.is_live())
            .map(Node::server_addr)
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!addrs.is_empty(), "no node of {} runs", self.name);
        async_nats::ConnectOptions::new()
            .connection_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .ignore_discovered_servers()
            .connect(addrs)
            .await
            .with_context(|| format!("cannot connect to cluster {}", self.name))
    }

    fn node_checked(&self, i: usize) -> anyhow::Result<&Node> {
        self.nodes
            .get(i)
            .with_context(|| format!("no node {i} in a cluster of {NODES}"))
    }

    fn node_checked_mut(&mut self, i: usize) -> anyhow::Result<&mut Node> {
        self.nodes
            .get_mut(i)
            .with_context(|| format!("no node {i} in a cluster of {NODES}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // SIGKILL also ends a stopped (paused) process; `kill_on_drop` would do it as well.
            if let Some(child) = node.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

impl Node {
    fn new(
        index: usize,
        cluster: &str,
        client_port: u16,
        cluster_ports: &[u16],
    ) -> anyhow::Result<Self> {
        let store = tempfile::tempdir().context("cannot make a store dir")?;
        let name = format!("n{index}");
        let cluster_port = *cluster_ports
            .get(index)
            .context("no cluster port for the node")?;
        let routes = cluster_ports
            .iter()
            .filter(|&&p| p != cluster_port)
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let store_path = store
            .path()
            .to_str()
            .context("store dir is not UTF-8")?
            .to_owned();
        let args = [
            "-a",
            "127.0.0.1",
            "-p",
            &client_port.to_string(),
            "-n",
            &name,
            "--cluster_name",
            cluster,
            "--cluster",
            &format!("nats://127.0.0.1:{cluster_port}"),
            "--routes",
            &routes,
            "-js",
            "-sd",
            &store_path,
            "-m",
            "-1",
        ]
        .map(str::to_owned)
        .to_vec();
        Ok(Self {
            index,
            name,
            client_port,
            cluster_port,
            args,
            store,
            child: None,
            paused: false,
            log: Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES))),
            boot: watch::channel(Boot::default()).1,
        })
    }

    /// Its index in the cluster.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its server name, `n<i>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Its client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// Its route URL, `nats://127.0.0.1:<cluster port>`.
    pub fn cluster_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.cluster_port)
    }

    /// Its monitoring URL (`http://127.0.0.1:<port>`, a new port each run), once it started.
    pub fn monitor_url(&self) -> Option<String> {
        self.boot
            .borrow()
            .monitor
            .map(|p| format!("http://127.0.0.1:{p}"))
    }

    /// Its store directory (`-sd`).
    pub fn store(&self) -> &Path {
        self.store.path()
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// It runs (it may be paused).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// It is stopped with SIGSTOP.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Its client URL parsed for `async_nats::connect`.
    pub fn server_addr(&self) -> anyhow::Result<ServerAddr> {
        self.url()
            .parse()
            .with_context(|| format!("bad server address {}", self.url()))
    }

    /// A client connected to this node only (it ignores the servers the cluster tells it about).
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .ignore_discovered_servers()
            .connect(self.server_addr()?)
            .await
            .with_context(|| format!("cannot connect to {}", self.name))
    }

    /// Its own copy of `stream`'s state (`messages`, `first_seq`, `last_seq`, ...) from its
    /// `/jsz`, whether it leads the stream or follows; `None` if it has no copy.
    pub async fn local_stream_state(&self, stream: &str) -> anyhow::Result<Option<Value>> {
        let jsz = self
            .jsz(&reqwest::Client::new(), "accounts=true&streams=true")
            .await?;
        let accounts = jsz
            .get("account_details")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        Ok(accounts
            .iter()
            .filter_map(|a| a.get("stream_detail").and_then(Value::as_array))
            .flatten()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(stream))
            .and_then(|s| s.get("state").cloned()))
    }

    /// Its `/healthz` answers 200: JetStream on this node is current (meta and its streams).
    pub async fn healthy(&self) -> anyhow::Result<bool> {
        self.healthz(&reqwest::Client::new()).await
    }

    /// The last lines it logged (up to 200, over all its runs).
    pub fn log(&self) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.iter().map(|l| format!("{l}\n")).collect()
    }

    fn is_live(&self) -> bool {
        self.child.is_some() && !self.paused
    }

    fn port_taken(&self) -> bool {
        self.boot.borrow().port_taken()
    }

    fn push_log(&self, line: String) {
        push_line(&self.log, line);
    }

    fn log_section(&self) -> String {
        let state = match (&self.child, self.paused) {
            (None, _) => "not running".to_owned(),
            (Some(_), true) => format!("paused, pid {}", self.pid().unwrap_or_default()),
            (Some(_), false) => format!("pid {}", self.pid().unwrap_or_default()),
        };
        format!(
            "==== {} ({}, cluster port {}, {state}) ====\n{}",
            self.name,
            self.url(),
            self.cluster_port,
            self.log()
        )
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(server_bin()?)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start nats-server {}", self.name))?;
        let (boot, rx) = watch::channel(Boot::default());
        let stdout = child.stdout.take().context("nats-server stdout")?;
        let stderr = child.stderr.take().context("nats-server stderr")?;
        tokio::spawn(read_log(stdout, self.name.clone(), self.log.clone(), None));
        tokio::spawn(read_log(
            stderr,
            self.name.clone(),
            self.log.clone(),
            Some(boot),
        ));
        self.boot = rx;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// Waits until this run logged "Server is ready", its route listener and its monitoring port.
    async fn wait_started(&self) -> anyhow::Result<()> {
        let mut rx = self.boot.clone();
        let boot = tokio::time::timeout(NODE_READY_TIMEOUT, rx.wait_for(Boot::settled))
            .await
            .with_context(|| format!("{} not ready within {NODE_READY_TIMEOUT:?}", self.name))?
            .map(|b| Boot::clone(&b))
            .unwrap_or_else(|_| Boot {
                exited: true,
                ..Boot::default()
            });
        if boot.started() {
            return Ok(());
        }
        match boot.fatal {
            Some(fatal) => bail!("{} failed to start: {fatal}", self.name),
            None => bail!("{} exited before it was ready", self.name),
        }
    }

    /// Waits until this node knows a meta leader, a client of this node only gets an answer from
    /// `$JS.API.INFO`, and its `/healthz` is ok.
    async fn wait_rejoined(&self, http: &reqwest::Client, limit: Duration) -> anyhow::Result<()> {
        let client = wait::until(&format!("a connection to {}", self.name), limit, || async {
            Ok(Some(self.client().await?))
        })
        .await?;
        wait::until(
            &format!("{} to answer JetStream and be healthy", self.name),
            limit,
            || async {
                // Without a meta leader the request would go unanswered until its timeout.
                if self.meta_cluster(http).await?.is_none() {
                    return Ok(None);
                }
                api(&client, "$JS.API.INFO").await?;
                Ok(self.healthz(http).await?.then_some(()))
            },
        )
        .await
    }

    async fn healthz(&self, http: &reqwest::Client) -> anyhow::Result<bool> {
        let url = format!("{}/healthz", self.monitor()?);
        let response = http
            .get(&url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        Ok(response.status().is_success())
    }

    async fn jsz(&self, http: &reqwest::Client, query: &str) -> anyhow::Result<Value> {
        let url = format!("{}/jsz?{query}", self.monitor()?);
        let response = http
            .get(&url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        anyhow::ensure!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response
            .json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))
    }

    /// `meta_cluster` of this node's `/jsz`; `None` while it knows no leader.
    async fn meta_cluster(&self, http: &reqwest::Client) -> anyhow::Result<Option<MetaCluster>> {
        let jsz = self.jsz(http, "").await?;
        let Some(meta) = jsz.get("meta_cluster") else {
            return Ok(None);
        };
        let leader = non_empty_str(meta, "/leader");
        let replicas = meta
            .get("replicas")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|r| MetaPeer {
                current: r.get("current").and_then(Value::as_bool) == Some(true),
            })
            .collect();
        Ok(leader.is_some().then(|| MetaCluster {
            leader,
            cluster_size: meta.get("cluster_size").and_then(Value::as_u64),
            replicas,
        }))
    }

    fn monitor(&self) -> anyhow::Result<String> {
        anyhow::ensure!(self.child.is_some(), "{} does not run", self.name);
        self.monitor_url()
            .with_context(|| format!("{} has no monitoring port yet", self.name))
    }

    /// SIGKILL, then wait for the exit.
    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .await
                .with_context(|| format!("cannot kill {}", self.name))?;
        }
        self.paused = false;
        Ok(())
    }

    async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} does not run", self.name))?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .await
            .context("cannot run kill")?;
        anyhow::ensure!(
            status.success(),
            "kill -{signal} {pid} ({}) failed",
            self.name
        );
        Ok(())
    }
}

/// What a node's `/jsz` says about the meta group.
#[derive(Debug)]
struct MetaCluster {
    leader: Option<String>,
    cluster_size: Option<u64>,
    /// The other peers, as this node sees them.
    replicas: Vec<MetaPeer>,
}

#[derive(Debug)]
struct MetaPeer {
    current: bool,
}

/// Reads a node's output line by line into its log; on stderr (`boot` given) also notes what the
/// run says about its start, and that it exited when the pipe closes.
async fn read_log(
    pipe: impl AsyncRead + Unpin,
    name: String,
    log: Arc<Mutex<VecDeque<String>>>,
    boot: Option<watch::Sender<Boot>>,
) {
    let echo = std::env::var_os("MEND_TEST_ECHO").is_some();
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            eprintln!("[{name}] {line}");
        }
        if let Some(boot) = &boot {
            boot.send_if_modified(|b| note(b, &line));
        }
        push_line(&log, line);
    }
    if let Some(boot) = &boot {
        boot.send_modify(|b| b.exited = true);
    }
}

/// Notes a start-up line; true if it changed anything.
fn note(boot: &mut Boot, line: &str) -> bool {
    if line.contains("Server is ready") {
        boot.ready = true;
    } else if line.contains("Listening for route connections on") {
        boot.routes = true;
    } else if let Some(addr) = line.split("Starting http monitor on ").nth(1) {
        boot.monitor = addr.trim().rsplit(':').next().and_then(|p| p.parse().ok());
    } else if line.contains("[FTL]") && boot.fatal.is_none() {
        boot.fatal = Some(line.to_owned());
    } else {
        return false;
    }
    true
}

fn push_line(log: &Mutex<VecDeque<String>>, line: String) {
    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
    if log.len() == LOG_LINES {
        log.pop_front();
    }
    log.push_back(line);
}

/// `n` distinct free loopback ports: all bound at once (so they differ), then released for the
/// servers to bind. Another process could take one in between; [`Cluster::start`] retries then.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot bind a free loopback port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// One JetStream API request with an empty body (at most [`REQUEST_TIMEOUT`]); the answer as
/// JSON, an `error` in it an error.
async fn api(client: &async_nats::Client, subject: &str) -> anyhow::Result<Value> {
    let answer = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.request(subject.to_owned(), Bytes::new()),
    )
    .await
    .with_context(|| format!("no answer to {subject} within {REQUEST_TIMEOUT:?}"))?
    .with_context(|| format!("request {subject}"))?;
    let json: Value = serde_json::from_slice(&answer.payload)
        .with_context(|| format!("answer to {subject} is not JSON"))?;
    if let Some(error) = json.get("error") {
        bail!("{subject}: {error}");
    }
    Ok(json)
}

fn non_empty_str(json: &Value, pointer: &str) -> Option<String> {
    json.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// What [`publish_until_stored`] got.
#[derive(Debug)]
pub struct Stored {
    /// The stream's acknowledgement (`duplicate` if an earlier try was stored after all).
    pub ack: jetstream::publish::PublishAck,
    /// The errors of the failed tries, in order.
    pub errors: Vec<String>,
}

/// Publishes `payload` to `subject` with `Nats-Msg-Id: id` until the stream acknowledges it,
/// retrying with the same id (so the stream stores it once) after a short backoff (25 ms doubling
/// to 500 ms) while a leader is elected; fails after `limit`.
pub async fn publish_until_stored(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    payload: Bytes,
    limit: Duration,
) -> anyhow::Result<Stored> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut backoff = Duration::from_millis(25);
    let mut errors = Vec::new();
    loop {
        let message = PublishMessage::build()
            .payload(payload.clone())
            .message_id(id);
        let sent: anyhow::Result<PublishAckFuture> = js
            .send_publish(subject.to_owned(), message)
            .await
            .map_err(anyhow::Error::from);
        let acked = match sent {
            Ok(ack) => ack.await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => return Ok(Stored { ack, errors }),
            Err(e) => errors.push(format!("{e:#}")),
        }
        if tokio::time::Instant::now() + backoff >= deadline {
            bail!(
                "message {id} on {subject} not stored within {limit:?}; {} tries failed, the last: {}",
                errors.len(),
                errors.last().map(String::as_str).unwrap_or_default()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Creates (or finds) the R3 file stream `name` on `subjects`, asking again while a cluster that
/// has just formed, on a busy machine, does not answer JetStream requests yet.
pub async fn r3_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[&str],
) -> anyhow::Result<()> {
    let config = jetstream::stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        storage: jetstream::stream::StorageType::File,
        num_replicas: 3,
        ..Default::default()
    };
    wait::until(
        &format!("stream {name} created"),
        crate::world::TEST_TIMEOUT,
        || async {
            Ok(js
                .get_or_create_stream(config.clone())
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await
    .with_context(|| format!("cannot create stream {name}"))
}
