//! The relay's portable loop: a level-triggered epoll set over the
//! thread's sockets, then recvfrom and sendto per packet. Used where
//! io_uring is not allowed (the default seccomp profiles of Docker and
//! containerd refuse it) or `media.relay_io` asks for it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::{drain_eventfd, Hold, Thread, Token, Watch, SWEEP_EVERY};

const WAKE_TOKEN: u64 = u64::MAX;
/// Large enough for any UDP datagram, so nothing is cut short.
const BUFFER: usize = 65536;
/// Room for the packets of one round, which are all read before any is
/// sent: the far ends then get theirs in one quick burst, and a receiver
/// woken by the first finds the rest waiting instead of being woken again.
const BATCH_BYTES: usize = 8 * BUFFER;

/// A level-triggered epoll set, with the thread's eventfd in it.
pub(super) struct Poll {
    fd: OwnedFd,
    wake: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Poll {
    pub(super) fn new(wake: RawFd) -> io::Result<Self> {
        // SAFETY: no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let poll = Self {
            // SAFETY: fd was just created and is owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            wake,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
        };
        poll.control(libc::EPOLL_CTL_ADD, wake, WAKE_TOKEN)?;
        Ok(poll)
    }

    fn control(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `event` outlives the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Tokens of the ready sockets.
    fn wait(&mut self, timeout: Duration) -> impl Iterator<Item = u64> + '_ {
        let capacity = libc::c_int::try_from(self.events.len()).unwrap_or(libc::c_int::MAX);
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the buffer holds `capacity` events and lives across the call.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                capacity,
                millis,
            )
        };
        let n = usize::try_from(n).unwrap_or(0);
        self.events.iter().take(n).map(|e| e.u64)
    }
}

impl Watch for Poll {
    fn watch(&mut self, socket: RawFd, token: Token) -> Hold {
        if let Err(e) = self.control(libc::EPOLL_CTL_ADD, socket, token.encode()) {
            tracing::error!(error = %e, "media relay cannot watch a socket");
        }
        Hold::default()
    }

    fn unwatch(&mut self, socket: RawFd, _token: Token, _hold: Hold) {
        if let Err(e) = self.control(libc::EPOLL_CTL_DEL, socket, 0) {
            tracing::warn!(error = %e, "media relay: epoll delete failed");
        }
    }
}

/// The packets of one round, back to back in `buffer`.
struct Batch {
    buffer: Vec<u8>,
    used: usize,
    packets: Vec<Outgoing>,
}

/// A packet read and checked, and where it goes.
struct Outgoing {
    token: Token,
    destination: SocketAddr,
    start: usize,
    len: usize,
}

pub(super) fn run(mut thread: Thread, mut poll: Poll) {
    let mut batch = Batch {
        buffer: vec![0u8; BATCH_BYTES],
        used: 0,
        packets: Vec::with_capacity(1024),
    };
    let mut ready = Vec::with_capacity(1024);
    loop {
        ready.clear();
        ready.extend(poll.wait(SWEEP_EVERY));
        let full = ready.len() == poll.events.len();
        let now = Instant::now();
        // Commands first, so that a packet arriving with the SDP that
        // tells where it goes is not dropped. A token of a socket that a
        // command just closed names no live stream any more.
        if ready.contains(&WAKE_TOKEN) {
            drain_eventfd(poll.wake);
            if !thread.commands(&mut poll) {
                break;
            }
        }
        let mut relayed = 0;
        for &token in ready.iter().filter(|&&t| t != WAKE_TOKEN) {
            if batch.buffer.len() - batch.used < BUFFER {
                relayed += send(&thread, &mut batch);
            }
            receive(&mut thread, Token::decode(token), &mut batch, now);
        }
        relayed += send(&thread, &mut batch);
        // A full event buffer means more sockets are ready: read them
        // at once rather than a tick later.
        if !full {
            if let Some(rest) = thread.pause(relayed > 0, now) {
                std::thread::sleep(rest);
            }
        }
        if !thread.end_round(relayed, now, &mut poll) {
            break;
        }
    }
    thread.shutdown(&mut poll);
}

/// Reads one datagram from `token`'s socket into `batch`, with where it
/// goes, unless it is to be dropped.
fn receive(thread: &mut Thread, token: Token, batch: &mut Batch, now: Instant) {
    let start = batch.used;
    let (Some(socket), Some(room)) = (
        thread.input(token),
        batch.buffer.get_mut(start..start + BUFFER),
    ) else {
        return;
    };
    let Ok((len, source)) = socket.recv_from(room) else {
        return;
    };
    let Some(destination) = thread.route(token, source, now) else {
        return;
    };
    batch.used += len;
    batch.packets.push(Outgoing {
        token,
        destination,
        start,
        len,
    });
}

/// Sends the packets of `batch`; returns how many went out.
fn send(thread: &Thread, batch: &mut Batch) -> u64 {
    let mut sent = 0;
    for packet in batch.packets.drain(..) {
        let (Some((socket, _)), Some(data)) = (
            thread.output(packet.token),
            batch.buffer.get(packet.start..packet.start + packet.len),
        ) else {
            continue;
        };
        if socket.send_to(data, packet.destination).is_err() {
            thread.failed(packet.token);
            continue;
        }
        thread.sent(packet.token, packet.len);
        sent += 1;
    }
    batch.used = 0;
    sent
}
