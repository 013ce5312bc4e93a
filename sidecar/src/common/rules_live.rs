//! The processor's rules in force, reloaded when their files change (SPEC §6): a good edit replaces
//! them at once; a bad edit is refused and logged, and the previous rules stay live. The folder is
//! watched rather than the file, because Kubernetes updates a mounted ConfigMap by swapping a symlink.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use repair_rules::rules::RuleSet;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::rules as rules_cli;
use crate::common::telemetry;

/// Quiet time after the last file event before reloading (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The rules in force and where they come from.
pub struct LiveRules {
    path: PathBuf,
    current: RwLock<(Arc<RuleSet>, String)>,
}

/// The hex SHA-256 of the rule files' names and contents, in load order.
pub fn digest(texts: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (name, text) in texts {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn compile(path: &Path) -> Result<(RuleSet, String, usize), String> {
    let files = rules_cli::collect(std::slice::from_ref(&path.to_path_buf()))?;
    let texts = rules_cli::read(&files).map_err(|e| format!("cannot read rules: {e}"))?;
    let rules = RuleSet::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())))
        .map_err(|e| e.to_string())?;
    Ok((rules, digest(&texts), files.len()))
}

impl LiveRules {
    /// Loads the rules at `path` (a file or a directory of `*.toml`).
    pub fn load(path: &Path) -> Result<Self, String> {
        let (rules, digest, files) = compile(path)?;
        tracing::info!(rules = rules.rules.len(), files, digest, "Rules loaded.");
        publish_metrics(&rules, None, &digest);
        Ok(Self {
            path: path.to_path_buf(),
            current: RwLock::new((Arc::new(rules), digest)),
        })
    }

    /// The rules in force now.
    pub fn get(&self) -> Arc<RuleSet> {
        match self.current.read() {
            Ok(c) => c.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// The digest of the rules in force.
    pub fn digest(&self) -> String {
        match self.current.read() {
            Ok(c) => c.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// Recompiles from disk; keeps the current rules when the files did not change or do not compile.
    pub fn reload(&self) {
        match compile(&self.path) {
            Ok((rules, digest, files)) => {
                let old = self.digest();
                if digest == old {
                    return;
                }
                publish_metrics(&rules, Some(&old), &digest);
                metrics::counter!(telemetry::RULES_RELOADS, "result" => "ok").increment(1);
                tracing::info!(rules = rules.rules.len(), files, digest, "Rules reloaded.");
                match self.current.write() {
                    Ok(mut c) => *c = (Arc::new(rules), digest),
                    Err(poisoned) => *poisoned.into_inner() = (Arc::new(rules), digest),
                }
            }
            Err(error) => {
                metrics::counter!(telemetry::RULES_RELOADS, "result" => "refused").increment(1);
                tracing::error!(%error, digest = self.digest(), "Rules edit refused; the previous rules stay live.");
            }
        }
    }
}

fn publish_metrics(rules: &RuleSet, old_digest: Option<&str>, digest: &str) {
    metrics::gauge!(telemetry::RULES_LOADED).set(rules.rules.len() as f64);
    if let Some(old) = old_digest {
        metrics::gauge!(telemetry::RULES_INFO, "digest" => old.to_owned()).set(0.0);
    }
    metrics::gauge!(telemetry::RULES_INFO, "digest" => digest.to_owned()).set(1.0);
}

/// The folder to watch for `path`: the folder itself, or a file's folder (`.` for a bare file name).
fn watch_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Reloads `live` whenever its files change, until `shutdown`.
pub async fn watch(live: Arc<LiveRules>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = tx.send(event);
    })?;
    watcher.watch(&watch_dir(&live.path), RecursiveMode::NonRecursive)?;
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(Err(error)) => tracing::warn!(%error, "Watching the rules failed for one event."),
                Some(Ok(_)) => {}
                None => return Ok(()),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
        while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
        live.reload();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(watch_dir(dir.path()), dir.path());
        assert_eq!(watch_dir(&dir.path().join("r.toml")), dir.path());
        assert_eq!(watch_dir(Path::new("rules.toml")), PathBuf::from("."));
    }

    #[test]
    fn digest_depends_on_names_and_contents() {
        let a = digest(&[("a.toml".into(), "x".into())]);
        assert_eq!(a.len(), 64);
        assert_ne!(a, digest(&[("b.toml".into(), "x".into())]));
        assert_ne!(a, digest(&[("a.toml".into(), "y".into())]));
        assert_eq!(a, digest(&[("a.toml".into(), "x".into())]));
    }
}
