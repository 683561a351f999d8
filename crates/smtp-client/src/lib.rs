//! Postroom's outbound side (SPEC §6): takes recipients tagged *forward* off the queue, finds
//! where their domains' mail goes (mail router, host table, MX then A/AAAA), delivers over
//! connections to each next hop that carry one message after another (issue 17), and reports
//! each recipient's result back to the queue. It only delivers; it never receives (DESIGN "Who
//! depends on whom").
#![forbid(unsafe_code)]

pub mod conversation;
mod dkim;
pub mod encode;
pub mod etrn;
pub mod local_submit;
mod next_hop;
pub mod queue_manager;
pub mod route;
pub mod trust;
