//! mend's dashboard (SPEC §9): ingest of MEND_PARKED and MEND_EVENTS into a sqlx store, the
//! server-rendered web UI and the JSON API, resubmission and control commands.
//!
//! The crate is part of the workspace layout from the start; its code arrives with the dashboard
//! itself. Architecture invariant for then: it is the only crate that runs SQL.
