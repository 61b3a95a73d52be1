//! Reader for the DROP_EVENTS ring buffer.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::maps::{MapData, RingBuf};
use dataplane_common::DropEvent;

/// Consumer side of the drop event ring buffer (single consumer: the kernel allows any number
/// of readers, but each record is delivered to only one of them).
///
/// Non-blocking: [`DropEvents::next`] returns `None` when the buffer is empty. To wait for
/// events, poll the file descriptor for readability (e.g. `tokio::io::unix::AsyncFd`).
pub struct DropEvents {
    ring: RingBuf<MapData>,
}

impl DropEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// The next event, or `None` if there is none right now.
    ///
    /// Not an `Iterator` because `None` means "empty for now", not "finished".
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<DropEvent> {
        loop {
            let item = self.ring.next()?;
            if item.len() < size_of::<DropEvent>() {
                // Only a datapath built from a different ABI can produce this.
                tracing::warn!(len = item.len(), "skipping short drop event");
                continue;
            }
            // SAFETY: the record holds at least size_of::<DropEvent>() bytes and DropEvent is
            // plain old data (every bit pattern is valid); read_unaligned needs no alignment.
            return Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DropEvent>()) });
        }
    }

    /// Drains everything currently in the buffer.
    pub fn drain(&mut self) -> Vec<DropEvent> {
        std::iter::from_fn(|| self.next()).collect()
    }
}

impl AsFd for DropEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for DropEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
