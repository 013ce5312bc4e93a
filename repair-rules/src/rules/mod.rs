//! Repair rules (SPEC §6, §10): parsing rule files, evaluating them against a failure envelope, and
//! running their inline tests. Pure: the caller reads files and does the publishing.
//!
//! - [`file`]: the TOML format and its compilation into a [`RuleSet`], with located errors.
//! - [`bounded`]: mend's expansion of CEL's comprehension macros, which stops at a deadline.
//! - [`env`]: the CEL environment: envelope fields as variables, JSON as CEL values, extra functions.
//! - [`eval`]: [`evaluate`] — first matching rule wins; repair, park, or park on error.
//! - [`inline`]: `[[rule.test]]` cases.
//! - [`draft`]: a rule drafted from a person's fix of a parked message.
//! - [`subject`]: NATS wildcard matching for the `subject` filter.

pub mod bounded;
pub mod draft;
pub mod env;
pub mod eval;
pub mod file;
pub mod inline;
pub mod subject;

pub use eval::{Decision, Limits, ParkReason, evaluate};
pub use file::{Rule, RuleError, RuleSet, Uses};
pub use inline::{TestFailure, run_tests};
