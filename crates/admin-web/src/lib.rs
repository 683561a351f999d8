//! The administrator's web console (SPEC E6, issue 19), served by `postroom serve` on
//! `[admin] listen`: a dashboard, the queue, the message trace, the quarantine, the users, the
//! domains, aliases, access lists, `explain`, the DKIM keys and the filters.
//!
//! Server-rendered HTML from compile-time templates (askama); one small script, the dashboard's
//! live refresh (static/refresh.js): every page works with the keyboard and without JavaScript. Security: HTTPS with the server's certificate (plain
//! HTTP only on loopback), administrators' mail passwords checked by the shared argon2 pool and
//! throttled by the penalty box (A5) like every other login, a Secure/HttpOnly/SameSite=Strict
//! session cookie, a CSRF token in every form, a Content-Security-Policy that allows nothing but
//! the console's own stylesheet, script and forms, and every change journaled (WC) with who made it.
//!
//! [`security`], [`counters`], [`preview`] and [`time`] do no I/O; [`server`] is the listener and
//! `routes` the handlers at the edge.
#![forbid(unsafe_code)]

pub mod counters;
mod pages;
pub mod preview;
mod routes;
pub mod security;
pub mod server;
pub mod time;

pub use server::{Console, ConsoleSettings, ExplainQuery, Explainer, Health};
