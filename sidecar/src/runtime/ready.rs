//! What `/readyz` says: ready only while every binding consumes here.

use crate::runtime::config::SidecarConfig;
use std::sync::Mutex;

/// Where a binding's supervisor stands, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the lease (and who holds it, once known).
    Waiting {
        holder: Option<String>,
    },
    /// The lease is held; binding the consumer and loading the holds.
    Starting,
    Consuming,
    /// The dispatcher is stopping (shutdown or a lost lease).
    Stopping,
}

/// The phase of every binding, and how each is named in `/readyz`.
pub(crate) struct Phases {
    pub(crate) names: Vec<String>,
    pub(crate) phases: Vec<Mutex<Phase>>,
}

impl Phases {
    pub(crate) fn new(config: &SidecarConfig) -> Self {
        let names = config
            .bindings
            .iter()
            .map(|b| {
                if b.is_partitioned() {
                    format!("binding {} (partition {})", b.name, config.partition)
                } else {
                    format!("binding {}", b.name)
                }
            })
            .collect::<Vec<_>>();
        let phases = names
            .iter()
            .map(|_| Mutex::new(Phase::Waiting { holder: None }))
            .collect();
        Self { names, phases }
    }

    pub(crate) fn len(&self) -> usize {
        self.phases.len()
    }

    pub(crate) fn get(&self, i: usize) -> Phase {
        match self.phases[i].lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set(&self, i: usize, phase: Phase) {
        match self.phases[i].lock() {
            Ok(mut p) => *p = phase,
            Err(poisoned) => *poisoned.into_inner() = phase,
        }
    }

    pub(crate) fn all_consuming(&self) -> bool {
        (0..self.len()).all(|i| self.get(i) == Phase::Consuming)
    }

    /// Ready when every binding consumes; else why not, binding by binding.
    pub(crate) fn ready(&self) -> Result<(), String> {
        let not: Vec<String> = (0..self.len())
            .filter_map(|i| {
                let why = match self.get(i) {
                    Phase::Consuming => return None,
                    Phase::Waiting { holder: Some(h) } => {
                        format!("waiting for the lease held by {h}")
                    }
                    Phase::Waiting { holder: None } => "waiting for the lease".to_owned(),
                    Phase::Starting => "binding its consumer and loading its holds".to_owned(),
                    Phase::Stopping => "stopping".to_owned(),
                };
                Some(format!("{}: {why}", self.names[i]))
            })
            .collect();
        if not.is_empty() {
            Ok(())
        } else {
            Err(not.join("; "))
        }
    }
}
