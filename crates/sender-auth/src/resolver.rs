//! The resolver every sender-authentication lookup goes through: the servers of `[dns]`, or the
//! system's when that list is empty, with a deadline per query. mail-auth caches answers for
//! their TTL.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::ResolverOpts;
use mail_auth::MessageAuthenticator;

/// Per query; a lookup that takes longer is a temporary error (temperror), never a refusal.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
#[error("DNS resolver for sender authentication: {0}")]
pub struct ResolverError(String);

/// A resolver for `servers` (IP:port each), or the system's configuration when empty. Reads
/// configuration only: nothing is sent until a lookup is made.
pub fn authenticator(servers: &[SocketAddr]) -> Result<MessageAuthenticator, ResolverError> {
    let mut opts = ResolverOpts::default();
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = 0;
    if servers.is_empty() {
        let (config, _) = hickory_resolver::system_conf::read_system_conf().map_err(|e| ResolverError(e.to_string()))?;
        return MessageAuthenticator::new(config, opts).map_err(|e| ResolverError(e.to_string()));
    }
    MessageAuthenticator::new(dns::servers_config(servers), opts).map_err(|e| ResolverError(e.to_string()))
}
