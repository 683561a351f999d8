//! Forwarding: recipients tagged *forward* wait in state `forward` for the SMTP client
//! (the outbound issue adds delivery); `postroom queue list` shows them.

use rusqlite::Connection;
use store::StoreError;

use crate::pipeline::{SnapIn, WorkItem};

pub struct Forwarding;

impl SnapIn for Forwarding {
    fn name(&self) -> &'static str {
        "forwarding"
    }

    fn apply(&self, _tx: &Connection, _items: &[WorkItem]) -> Result<(), StoreError> {
        // The state change to `forward` is recorded by the pipeline with the P2 journal row.
        Ok(())
    }
}
