//! The pure core of mend: the types every role shares and the logic that needs no I/O.
//!
//! # Layout
//! - [`batch`]: bulk delivery's wire contract: CloudEvents batch entries and the per-entry statuses.
//! - [`envelope`]: the versioned failure envelope of SPEC §5 and its error and history records.
//! - [`identity`]: the lineage id (`Mend-Id`), message keys and the subjects mend publishes on.
//! - [`headers`]: the names of the headers of SPEC §3, declared once.
//! - [`holds`]: the holding-queue protocol of one key (SPEC §7) as pure decisions.
//! - [`problem`]: turning an app's error answer (RFC 9457 problem+json or any body) into an error record.
//! - [`rules`]: repair rules: the file format, CEL evaluation, decisions, inline tests.
//!
//! Architecture invariant: this crate does no I/O and depends on no async runtime, NATS client, HTTP
//! stack or database driver; `make test` checks its dependency tree.

pub mod batch;
pub mod envelope;
pub mod headers;
pub mod holds;
pub mod identity;
pub mod problem;
pub mod rules;

pub use envelope::{ENVELOPE_VERSION, ErrorKind, FailureEnvelope, FailureError, HistoryEntry};
pub use identity::{LineageId, MessageKey};
