//! Messages waiting for a connection to their next hop (issue 17: outbound connection reuse).
//!
//! A delivery worker holds one connection to one next hop; after each message's final reply it
//! takes the next message waiting for the same next hop and sends it over the same connection
//! (RSET between them), or waits a short while for one to arrive — as Postfix's connection cache
//! does (`smtp_connection_cache_time_limit`). [`Lanes`] is where those messages wait: one queue
//! per [`NextHop`], and a count of the workers idling on it.
//!
//! The promise that keeps a message from being stranded: a worker that idles on a lane takes
//! exactly one message when it wakes, if one is there — it pops under the same lock under which
//! it stops idling. So [`Lanes::push`] can tell whether an idle worker will surely take the
//! message (more idle workers than waiting messages); when it cannot, the message's own task
//! must find it a worker (C6: within the connection limits).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::route::Host;

/// What a connection is for: the same destination domain (its C6 limit), the same route (hosts
/// and addresses, in order) and the same settings. Only messages for the same next hop share a
/// connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NextHop {
    pub domain: String,
    pub hosts: Vec<Host>,
    /// Which settings (O6: reloaded ones make new connections).
    pub generation: u64,
}

struct Lane<J> {
    jobs: VecDeque<J>,
    /// Workers waiting on this lane for a message.
    idle: usize,
    arrived: Arc<Notify>,
}

impl<J> Default for Lane<J> {
    fn default() -> Self {
        Lane { jobs: VecDeque::new(), idle: 0, arrived: Arc::new(Notify::new()) }
    }
}

pub(crate) struct Lanes<J> {
    lanes: Mutex<HashMap<NextHop, Lane<J>>>,
}

impl<J> Default for Lanes<J> {
    fn default() -> Self {
        Lanes { lanes: Mutex::default() }
    }
}

impl<J> Lanes<J> {
    /// Queue `job` for `hop`. True when an idle worker will take it; false when the caller must
    /// see that some worker does.
    pub fn push(&self, hop: &NextHop, job: J) -> bool {
        let mut lanes = self.lanes.lock().expect("lanes");
        let lane = lanes.entry(hop.clone()).or_default();
        let taken = lane.idle > lane.jobs.len();
        lane.jobs.push_back(job);
        lane.arrived.notify_waiters();
        taken
    }

    /// The oldest message waiting for `hop`.
    pub fn pop(&self, hop: &NextHop) -> Option<J> {
        let mut lanes = self.lanes.lock().expect("lanes");
        Self::pop_locked(&mut lanes, hop)
    }

    fn pop_locked(lanes: &mut HashMap<NextHop, Lane<J>>, hop: &NextHop) -> Option<J> {
        let lane = lanes.get_mut(hop)?;
        let job = lane.jobs.pop_front();
        if lane.jobs.is_empty() && lane.idle == 0 {
            lanes.remove(hop);
        }
        job
    }

    /// A message for `hop` now, or the first that arrives within `limit`; None when none came or
    /// `interrupt` was notified first (shutdown, or another destination waits for a connection
    /// slot this worker holds).
    pub async fn wait(&self, hop: &NextHop, limit: Duration, interrupt: &Notify) -> Option<J> {
        let deadline = tokio::time::Instant::now() + limit;
        let interrupted = interrupt.notified();
        tokio::pin!(interrupted);
        interrupted.as_mut().enable();
        loop {
            let arrived = {
                let mut lanes = self.lanes.lock().expect("lanes");
                if let Some(job) = Self::pop_locked(&mut lanes, hop) {
                    return Some(job);
                }
                let lane = lanes.entry(hop.clone()).or_default();
                lane.idle += 1;
                lane.arrived.clone()
            };
            // A push between the unlock above and this enable() is seen below: the lane is
            // checked again under the lock once idling ends, whatever ended it.
            let notified = arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stop = tokio::select! {
                _ = notified => false,
                _ = tokio::time::sleep_until(deadline) => true,
                _ = &mut interrupted => true,
            };
            let mut lanes = self.lanes.lock().expect("lanes");
            if let Some(lane) = lanes.get_mut(hop) {
                lane.idle -= 1;
            }
            if let Some(job) = Self::pop_locked(&mut lanes, hop) {
                return Some(job);
            }
            if lanes.get(hop).is_some_and(|l| l.jobs.is_empty() && l.idle == 0) {
                lanes.remove(hop);
            }
            if stop {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(domain: &str) -> NextHop {
        NextHop { domain: domain.into(), hosts: vec![Host { name: "mx.test".into(), addrs: vec!["127.0.0.1:25".parse().unwrap()] }], generation: 0 }
    }

    #[tokio::test]
    async fn an_idle_worker_takes_what_arrives_for_its_hop_only() {
        let lanes = Arc::new(Lanes::<u32>::default());
        let never = Arc::new(Notify::new());
        let (l, n) = (lanes.clone(), never.clone());
        let worker = tokio::spawn(async move { l.wait(&hop("a.test"), Duration::from_secs(5), &n).await });
        while lanes.lanes.lock().unwrap().get(&hop("a.test")).is_none_or(|l| l.idle == 0) {
            tokio::task::yield_now().await;
        }
        assert!(!lanes.push(&hop("b.test"), 2), "no worker idles for b.test");
        assert!(lanes.push(&hop("a.test"), 1), "the idle worker takes it");
        assert_eq!(worker.await.unwrap(), Some(1));
        assert_eq!(lanes.pop(&hop("b.test")), Some(2));
        assert!(lanes.lanes.lock().unwrap().is_empty(), "empty lanes are dropped");
    }

    #[tokio::test]
    async fn waiting_ends_after_the_limit_or_when_interrupted() {
        let lanes = Lanes::<u32>::default();
        let interrupt = Notify::new();
        assert_eq!(lanes.wait(&hop("a.test"), Duration::from_millis(20), &interrupt).await, None);
        let a = hop("a.test");
        let waiting = lanes.wait(&a, Duration::from_secs(60), &interrupt);
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut waiting).await.is_err());
        interrupt.notify_waiters();
        assert_eq!(waiting.await, None);
        assert!(lanes.lanes.lock().unwrap().is_empty());
        // What already waits is taken at once.
        assert!(!lanes.push(&hop("a.test"), 7));
        assert_eq!(lanes.wait(&hop("a.test"), Duration::from_secs(60), &interrupt).await, Some(7));
    }
}
