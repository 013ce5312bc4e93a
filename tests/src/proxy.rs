//! A loopback TCP proxy in front of a nats-server that can stall one client's connection without
//! closing it, the way a network partition or a stuck host does: what the client sends from a chosen
//! publish on is held back (the client still believes it is connected and its writes succeed), and
//! sent on, in order, when the test thaws it. Server-to-client traffic always flows.
//!
//! The stall is armed on a subject prefix: the first `PUB`/`HPUB` whose subject starts with it, and
//! everything the client sends after it, is held. So a test stops a client's writes exactly before a
//! chosen operation (say, a purge request) without guessing at timing.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct State {
    /// The subject prefix that stalls the connections when a publish to it is seen.
    armed: Option<String>,
    /// Whether client writes are being held (on every connection, as a partition would).
    frozen: bool,
    /// Reply subjects of the held publishes to the armed prefix.
    replies: Vec<String>,
    /// Bytes held, over all connections.
    held: usize,
    /// Wakes each connection's pump to send its held bytes on.
    wakes: Vec<Arc<tokio::sync::Notify>>,
}

/// A proxy for client connections to one nats-server.
pub struct NatsProxy {
    port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl NatsProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream_port`.
    pub async fn start(upstream_port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                tokio::spawn(pump(client, server, shared.clone()));
            }
        });
        Ok(Self { port, state, task })
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stalls the clients' writes from the first publish to a subject starting with `prefix` on.
    pub fn freeze_on(&self, prefix: &str) {
        self.state.lock().unwrap().armed = Some(prefix.to_owned());
    }

    /// Whether writes are held now.
    pub fn frozen(&self) -> bool {
        self.state.lock().unwrap().frozen
    }

    /// The reply subjects of the held publishes to the armed prefix (requests whose answers a test
    /// can wait for after thawing).
    pub fn held_replies(&self) -> Vec<String> {
        self.state.lock().unwrap().replies.clone()
    }

    /// How many bytes were held since the stall began.
    pub fn held_bytes(&self) -> usize {
        self.state.lock().unwrap().held
    }

    /// Sends the held bytes on, in order per connection, and lets writes flow again (disarmed).
    pub fn thaw(&self) {
        let mut state = self.state.lock().unwrap();
        state.armed = None;
        state.frozen = false;
        for wake in &state.wakes {
            wake.notify_one();
        }
    }
}

impl Drop for NatsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one connection both ways; client-to-server by protocol operation, so a publish to the
/// armed prefix can start the stall.
async fn pump(client: TcpStream, server: TcpStream, state: Arc<Mutex<State>>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    });
    let wake = Arc::new(tokio::sync::Notify::new());
    state.lock().unwrap().wakes.push(wake.clone());
    let mut pending: Vec<u8> = Vec::new();
    let mut held: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = client_rx.read(&mut buf) => read.map(Some),
            () = wake.notified() => Ok(None),
        };
        match read {
            Ok(Some(0)) | Err(_) => break,
            Ok(Some(n)) => pending.extend_from_slice(&buf[..n]),
            Ok(None) => {}
        }
        // Complete operations are forwarded or held; a partial one waits for more bytes.
        let mut out = Vec::new();
        {
            let mut s = state.lock().unwrap();
            if !s.frozen {
                out.append(&mut held);
            }
            while let Some((len, subject, reply)) = operation(&pending) {
                let op: Vec<u8> = pending.drain(..len).collect();
                let to_armed = match (&s.armed, &subject) {
                    (Some(prefix), Some(subject)) => subject.starts_with(prefix.as_str()),
                    _ => false,
                };
                if to_armed {
                    s.frozen = true;
                    if let Some(reply) = reply {
                        s.replies.push(reply);
                    }
                }
                if s.frozen {
                    s.held += op.len();
                    held.extend_from_slice(&op);
                } else {
                    out.extend_from_slice(&op);
                }
            }
        }
        if !out.is_empty() && server_tx.write_all(&out).await.is_err() {
            break;
        }
    }
    let _ = server_tx.shutdown().await;
    down.abort();
}

/// The length of the first complete client operation in `buf`, with its subject and reply subject
/// when it is a publish; `None` while it is incomplete.
fn operation(buf: &[u8]) -> Option<(usize, Option<String>, Option<String>)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&buf[..line_end]);
    let mut words = line.split_ascii_whitespace();
    let op = words.next().unwrap_or("").to_ascii_uppercase();
    let args: Vec<&str> = words.collect();
    let (subject, reply, size) = match (op.as_str(), args.as_slice()) {
        ("PUB", [s, n]) => (s, None, n),
        ("PUB", [s, r, n]) => (s, Some(r), n),
        ("HPUB", [s, _h, n]) => (s, None, n),
        ("HPUB", [s, r, _h, n]) => (s, Some(r), n),
        _ => return Some((line_end + 2, None, None)),
    };
    let size: usize = size.parse().ok()?;
    let total = line_end + 2 + size + 2;
    (buf.len() >= total).then(|| {
        (
            total,
            Some((*subject).to_owned()),
            reply.map(|r| (*r).to_owned()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::operation;

    #[test]
    fn operations_are_cut_whole() {
        assert_eq!(operation(b"PING\r\nPONG"), Some((6, None, None)));
        assert_eq!(operation(b"PUB a.b 5\r\nhel"), None);
        assert_eq!(
            operation(b"PUB a.b _INBOX.x 5\r\nhello\r\nPING\r\n"),
            Some((27, Some("a.b".into()), Some("_INBOX.x".into())))
        );
        assert_eq!(
            operation(b"HPUB a r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n"),
            Some((32, Some("a".into()), Some("r".into())))
        );
    }
}
