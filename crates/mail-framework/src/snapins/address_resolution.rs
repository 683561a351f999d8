//! Address resolution (the seeds' "MSF SMTP exit for Address Resolution", journal P):
//! local users → local delivery, other domains → forward, unknown local → non-delivery.

use directory::Resolution;
use mail_proto::Address;
use store::StoreError;

use crate::pipeline::{Context, SnapIn, Tag, WorkItem};

pub struct AddressResolution;

impl SnapIn for AddressResolution {
    fn name(&self) -> &'static str {
        "address-resolution"
    }

    fn examine(&self, ctx: &Context<'_>, items: &mut [WorkItem]) -> Result<(), StoreError> {
        for item in items.iter_mut().filter(|i| i.tag == Tag::Unresolved) {
            item.tag = match parse_recipient(&item.address) {
                None => Tag::NonDelivery { status: "5.1.3".into(), reason: "bad recipient address syntax".into() },
                Some(addr) => match ctx.domains.resolve(ctx.conn, &addr).map_err(|e| StoreError::Invalid(e.to_string()))? {
                    Resolution::Local { user_id, user } => Tag::LocalDelivery { user_id, user },
                    Resolution::Remote => Tag::Forward,
                    // The user went away between RCPT and now (RCPT refuses unknown users).
                    Resolution::Unknown => Tag::NonDelivery { status: "5.1.1".into(), reason: "user unknown".into() },
                },
            };
        }
        Ok(())
    }
}

/// A stored recipient: `local@domain`, or the bare `postmaster` RCPT allows.
fn parse_recipient(s: &str) -> Option<Address> {
    if !s.contains('@') && s.eq_ignore_ascii_case("postmaster") {
        return Some(Address { local: s.to_string(), domain: String::new(), quoted: false, source_route: false });
    }
    Address::parse(s).ok()
}
