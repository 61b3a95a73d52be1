//! Serving one container's 127.0.0.11:53: UDP with our batching loop (`udp`), TCP with hickory's
//! server.

use std::future::Future;
use std::time::Duration;

use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tracing::{debug, warn};

use crate::{DnsError, ScopedHandler};

/// A TCP connection that sends no query for this long is closed, so idle or stalled clients
/// cannot pin connections (and tasks) forever.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers queued per TCP connection before the connection's reader waits for the writer.
const TCP_RESPONSE_BUFFER: usize = 32;
/// How long shutdown waits for the listeners' tasks to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves `handler` on `udp` and `tcp` (already bound, typically to 127.0.0.11:53 inside the
/// container's network namespace: a socket keeps the namespace it was created in) until
/// `shutdown` completes or a listener fails.
///
/// Returns `Ok(())` after a requested shutdown; an error if a listener stopped by itself.
/// Must run on a Tokio runtime; forwarded queries open their sockets from the runtime's
/// threads, i.e. in the namespace those threads are in.
pub async fn serve<F>(
    handler: ScopedHandler,
    udp: UdpSocket,
    tcp: TcpListener,
    shutdown: F,
) -> Result<(), DnsError>
where
    F: Future<Output = ()> + Send,
{
    let local = udp.local_addr().ok();
    // UDP, nearly every query, is served by our batching loop; TCP by hickory's server.
    let udp_loop = crate::udp::serve(handler.clone(), std::sync::Arc::new(udp));
    let mut server = Server::new(handler);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    let token = server.shutdown_token().clone();
    debug!(addr = ?local, "dns listeners started");

    tokio::select! {
        () = shutdown => {}
        res = udp_loop => {
            return Err(DnsError::Listener(match res {
                Ok(()) => "UDP listener stopped unexpectedly".into(),
                Err(e) => format!("UDP listener: {e}"),
            }));
        }
        res = server.block_until_done() => {
            // A listener task ended without being asked to: the socket is gone.
            return match res {
                Ok(()) => Err(DnsError::Listener("listeners stopped unexpectedly".into())),
                Err(e) => Err(DnsError::Listener(e.to_string())),
            };
        }
    }

    token.cancel();
    // hickory's listener loops exit on cancellation and drop their per-request tasks; the
    // bound only guards against a task that would not notice.
    match tokio::time::timeout(SHUTDOWN_GRACE, server.block_until_done()).await {
        Ok(Ok(())) => {
            debug!(addr = ?local, "dns listeners stopped");
            Ok(())
        }
        Ok(Err(e)) => Err(DnsError::Listener(e.to_string())),
        Err(_) => {
            warn!(addr = ?local, "dns listeners did not stop in time");
            Err(DnsError::ShutdownTimeout)
        }
    }
}
