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

/// `postmaster` receives reports about failed reports.
pub fn builtin(postmaster: &str) -> Vec<Box<dyn SnapIn>> {
    vec![
        Box::new(AddressResolution),
        Box::new(Filtering::default()),
        Box::new(LocalDelivery),
        Box::new(Forwarding),
        Box::new(NonDelivery { postmaster: postmaster.to_string() }),
    ]
}
