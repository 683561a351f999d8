//! The built-in snap-ins, in the order the framework calls them (F2).

mod address_resolution;
mod filtering;
mod forwarding;
mod local_delivery;
mod non_delivery;

pub use address_resolution::AddressResolution;
pub use filtering::Filtering;
pub use forwarding::Forwarding;
pub use local_delivery::LocalDelivery;
pub use non_delivery::NonDelivery;

use crate::SnapIn;
use crate::outbound::EtrnDomains;
use crate::reports::ReportSettings;

/// What the filters parse of a message unless configured otherwise (10 MiB).
pub const DEFAULT_FILTER_MAX_BYTES: usize = 10 * 1024 * 1024;

/// What the built-in snap-ins are configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Receives reports about failed reports.
    pub postmaster: String,
    /// Octets of a message the filters parse, at most.
    pub filter_max_bytes: usize,
    /// Quarantine a message the filters could not inspect completely (F3: fail closed).
    pub keep_unscannable: bool,
    pub reports: ReportSettings,
    /// Dial-up domains whose mail waits for ETRN (C7).
    pub etrn: EtrnDomains,
}

impl Settings {
    pub fn new(postmaster: &str, hostname: &str) -> Self {
        Settings {
            postmaster: postmaster.to_string(),
            filter_max_bytes: DEFAULT_FILTER_MAX_BYTES,
            keep_unscannable: true,
            reports: ReportSettings::new(hostname),
            etrn: EtrnDomains::default(),
        }
    }
}

pub fn builtin(settings: &Settings) -> Vec<Box<dyn SnapIn>> {
    vec![
        Box::new(AddressResolution),
        Box::new(Filtering { max_bytes: settings.filter_max_bytes, keep_unscannable: settings.keep_unscannable, ..Filtering::default() }),
        Box::new(LocalDelivery { reports: settings.reports.clone() }),
        Box::new(Forwarding { etrn: settings.etrn.clone() }),
        Box::new(NonDelivery { postmaster: settings.postmaster.clone(), reports: settings.reports.clone() }),
    ]
}
