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

/// `hostname` signs non-delivery reports; `postmaster` receives reports about failed reports.
pub fn builtin(hostname: &str, postmaster: &str) -> Vec<Box<dyn SnapIn>> {
    vec![
        Box::new(AddressResolution),
        Box::new(Filtering::default()),
        Box::new(LocalDelivery),
        Box::new(Forwarding),
        Box::new(NonDelivery { hostname: hostname.to_string(), postmaster: postmaster.to_string() }),
    ]
}
