//! The accept loop every TCP listener of the server shares (SMTP, POP3, LDAP, the web console):
//! take connections until shutdown and hand each to its service. An accept that fails — out of
//! descriptors (EMFILE) above all — is logged and retried after a pause, so a full process
//! neither spins on the error nor stops listening.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The pause after a failed accept.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Resolves once `rx` says the server is shutting down (at once if it already does).
pub async fn until_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|down| *down).await;
}

/// Accept on `listener` until `shutdown`, calling `take` with every connection; `service` names
/// the listener in the log.
pub async fn until_shutdown_accept(
    listener: &TcpListener,
    shutdown: &watch::Receiver<bool>,
    service: &str,
    mut take: impl FnMut(TcpStream, SocketAddr),
) {
    let mut shutdown = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = until_shutdown(&mut shutdown) => return,
        };
        match accepted {
            Ok((stream, peer)) => take(stream, peer),
            Err(e) => {
                tracing::warn!(error = %e, "{service} accept failed");
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hands_over_every_connection_and_returns_at_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            until_shutdown_accept(&listener, &rx, "test", |_, peer| seen_tx.send(peer).unwrap()).await;
        });
        for _ in 0..3 {
            let client = TcpStream::connect(addr).await.unwrap();
            assert_eq!(seen_rx.recv().await.unwrap(), client.local_addr().unwrap());
        }
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("the loop ends at shutdown").unwrap();
    }
}
