//! The API's unix socket: root only, from the first moment, and checked per connection.
//!
//! The socket file is created with a umask that leaves it 0600 at bind (a chmod after bind
//! leaves a window in which anyone could connect), and every accepted connection's peer
//! credentials (SO_PEERCRED) must be uid 0, so a socket left world-accessible by a mistaken
//! chmod or a permissive directory still refuses other users.

use std::io;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{UnixListener, UnixStream};

/// The uid allowed to talk to the agent.
const ROOT: u32 = 0;

pub struct RootOnly {
    inner: UnixListener,
}

/// Binds `socket` with mode 0600.
pub fn bind(socket: &Path) -> anyhow::Result<RootOnly> {
    // umask is per process: the few files other threads create during these microseconds
    // get stricter permissions than they asked for, never looser.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let inner = bound.with_context(|| format!("binding {}", socket.display()))?;
    Ok(RootOnly { inner })
}

impl axum::serve::Listener for RootOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == ROOT => return (stream, addr),
                    Ok(cred) => {
                        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused API connection from a non-root user");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused API connection: no peer credentials")
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
