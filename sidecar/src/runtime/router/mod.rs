//! The sidecar's retry path (SPEC §1, §3): repaired and resubmitted messages arrive on
//! `mend.retry.<service>` (stream MEND_RETRY), are routed to the binding of their original message,
//! and go through that key's lane like any message. Their lineage comes from the headers: `Mend-Id`,
//! `Mend-Attempt`, `Mend-Original-Subject`, `Mend-Key`, `Mend-Repaired-By`, `Mend-Resubmitted-By`,
//! `Mend-History`. A retry that cannot be routed (no valid `Mend-Id`, or a stream no binding
//! consumes) is parked for a person, never dropped.
//!
//! Commands from the dashboard arrive on `mend.control.<service>` (stream MEND_CONTROL) as JSON
//! `{"action": "discard" | "release", "key": …, "id": <lineage>, "binding": …}` and go the same way,
//! into the lane of their key. A command that is not one is refused (terminated, logged, counted).
//!
//! Every instance of a service pulls the same two consumers. A binding's dispatcher takes routed
//! messages only while this instance holds its lease ([`Dispatchers`]); one this instance does not
//! consume now is handed back for another instance to take. A partitioned binding's retry or command
//! belongs to the partition whose subjects match its original message's subject (a command's
//! original is read from the app stream); one of another partition is forwarded to
//! `mend.retry.<service>.p<k>` / `mend.control.<service>.p<k>`, which the instance of partition `k`
//! consumes (`mend-<service>-retry-p<k>`, `mend-<service>-control-p<k>`) into the same routing.
//!
//! Modules, each using only those before it: [`inbox`], [`control`], [`park`], [`route`].

pub mod control;
pub mod inbox;
pub mod park;
pub mod route;

pub use inbox::{
    Dispatchers, Inbound, Inbox, Router, bind, bind_control, consumer_name, control_consumer_name,
};
pub use route::{route, route_control};
