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

/// What the filters parse of a message unless configured otherwise (10 MiB).
pub const DEFAULT_FILTER_MAX_BYTES: usize = 10 * 1024 * 1024;

/// `postmaster` receives reports about failed reports; the filters parse at most
/// `filter_max_bytes` of a message.
pub fn builtin(postmaster: &str, filter_max_bytes: usize) -> Vec<Box<dyn SnapIn>> {
    vec![
        Box::new(AddressResolution),
        Box::new(Filtering::with_max_bytes(filter_max_bytes)),
        Box::new(LocalDelivery),
        Box::new(Forwarding),
        Box::new(NonDelivery { postmaster: postmaster.to_string() }),
    ]
}
