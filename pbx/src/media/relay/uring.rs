//! The relay's io_uring loop (Linux 6.1 and later). One multishot recvmsg
//! per socket takes its packets into a ring of provided buffers, and each
//! packet leaves from the buffer it arrived in, as a send queued on the same
//! ring. A round of packets then costs one or two system calls instead of
//! an epoll_wait plus a recvfrom and a sendto per packet. With
//! DEFER_TASKRUN the kernel runs the receives only when this thread enters
//! the ring, so packets arriving while a busy thread waits for the end of
//! its tick do not wake it.

use std::alloc::{self, Layout};
use std::io;
use std::mem::ManuallyDrop;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};
use socket2::SockAddr;

use super::{drain_eventfd, Hold, Thread, Token, Watch, SWEEP_EVERY};

/// Provided buffers per thread, a power of two. A packet holds one from its
/// receive until its send is issued, within the round; when all are taken,
/// packets wait in their sockets until the next pass. A round at 1,600
/// calls brings about 320 packets.
const BUFFERS: u16 = 512;
/// Per buffer: the recvmsg header, the source address and a datagram of up
/// to 9,172 bytes, a jumbo frame's worth (4.7 MB a thread in all). RTP
/// travels in packets below the path MTU; a longer datagram is dropped and
/// counted.
const BUFFER_SIZE: usize = 9216;
const GROUP: u16 = 0;
const SUBMISSION_ENTRIES: u32 = 2048;
const COMPLETION_ENTRIES: u32 = 8192;

/// The top two bits of a request's user data say what it is.
const TAG: u64 = 3 << 62;
const RECEIVE: u64 = 0;
const SEND: u64 = 1 << 62;
const WAKE: u64 = 2 << 62;
const CANCEL: u64 = 3 << 62;
/// Entries per round at most, so that commands and the sweep still run
/// under a flood.
const MAX_PASSES: u32 = 256;
/// IORING_ENTER_GETEVENTS: run the receives that are due.
const GETEVENTS: u32 = 1;

/// A send queued or just issued: its buffer is busy, and the address it
/// goes to must stay where the kernel was told it is, until it is issued.
/// Sends are issued with MSG_DONTWAIT, so they are done (sent or failed)
/// when the entry that submitted them returns, and only failures post a
/// completion.
struct InFlight {
    token: Token,
    len: usize,
    address: SockAddr,
    failed: bool,
}

/// The provided-buffer ring: the ring of entries the kernel takes buffers
/// from, and the buffers' memory. The kernel writes into both behind the
/// program's back, so both are raw allocations read only through pointers.
struct Buffers {
    entries: NonNull<BufRingEntry>,
    memory: NonNull<u8>,
    tail: u16,
}

fn entries_layout() -> io::Result<Layout> {
    Layout::from_size_align(usize::from(BUFFERS) * size_of::<BufRingEntry>(), 4096)
        .map_err(io::Error::other)
}

fn memory_layout() -> io::Result<Layout> {
    Layout::from_size_align(usize::from(BUFFERS) * BUFFER_SIZE, 64).map_err(io::Error::other)
}

impl Buffers {
    fn new() -> io::Result<Self> {
        let out_of_memory = || io::Error::from(io::ErrorKind::OutOfMemory);
        // SAFETY: both layouts have a non-zero size.
        let entries = unsafe { alloc::alloc_zeroed(entries_layout()?) };
        let entries = NonNull::new(entries.cast::<BufRingEntry>()).ok_or_else(out_of_memory)?;
        // SAFETY: as above.
        let memory = unsafe { alloc::alloc_zeroed(memory_layout()?) };
        let Some(memory) = NonNull::new(memory) else {
            // SAFETY: allocated just above with this layout.
            unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout()?) };
            return Err(out_of_memory());
        };
        let mut buffers = Self {
            entries,
            memory,
            tail: 0,
        };
        for bid in 0..BUFFERS {
            buffers.give_back(bid);
        }
        buffers.publish();
        Ok(buffers)
    }

    /// Returns buffer `bid` to the kernel, at the next `publish`.
    fn give_back(&mut self, bid: u16) {
        if bid >= BUFFERS {
            return;
        }
        let index = usize::from(self.tail & (BUFFERS - 1));
        // SAFETY: index < BUFFERS, inside the entries' allocation; the
        // kernel only reads entries past the published tail.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        entry.set_addr(self.memory.as_ptr() as u64 + (usize::from(bid) * BUFFER_SIZE) as u64);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given back visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field lies in the first entry of the live ring;
        // the kernel reads it concurrently, hence the atomic store.
        let tail = unsafe { BufRingEntry::tail(self.entries.as_ptr()) }.cast::<AtomicU16>();
        // SAFETY: as above; u16 and AtomicU16 share size and alignment.
        unsafe { (*tail).store(self.tail, Ordering::Release) };
    }

    /// The first `len` bytes of buffer `bid`, which the kernel has filled
    /// and handed over.
    fn get(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= BUFFERS || len > BUFFER_SIZE {
            return None;
        }
        // SAFETY: inside the allocation; the kernel no longer writes to a
        // buffer it has completed a receive into, until it is given back.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.memory.as_ptr().add(usize::from(bid) * BUFFER_SIZE),
                len,
            )
        })
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        if let (Ok(entries), Ok(memory)) = (entries_layout(), memory_layout()) {
            // SAFETY: allocated in `new` with these layouts; the ring that
            // used them is unregistered and its requests are over.
            unsafe {
                alloc::dealloc(self.entries.as_ptr().cast(), entries);
                alloc::dealloc(self.memory.as_ptr(), memory);
            }
        }
    }
}

pub(super) struct Ring {
    ring: IoUring,
    buffers: ManuallyDrop<Buffers>,
    /// The msghdr the multishot receives were armed with: it tells the
    /// kernel how much room the source address takes in each buffer.
    header: Box<libc::msghdr>,
    /// By buffer id: the send that buffer is in flight as.
    sends: Vec<Option<InFlight>>,
    /// Buffers of sends in the submission queue, and of sends the kernel
    /// has issued, whose failures are among the completions to be read.
    queued: Vec<u16>,
    issued: Vec<u16>,
    wake: RawFd,
    completed: Vec<(u64, i32, u32)>,
    /// Free places of the ring's fixed-file table. A socket registered
    /// there is not looked up by descriptor on every send.
    fixed: Vec<u32>,
}

impl Ring {
    /// Sets up a ring for up to `sockets` sockets, or says why this kernel
    /// (or its seccomp filter) will not have one.
    pub(super) fn new(wake: RawFd, sockets: usize) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .setup_cqsize(COMPLETION_ENTRIES)
            .build(SUBMISSION_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let needed = [
            opcode::RecvMsgMulti::CODE,
            opcode::Send::CODE,
            opcode::AsyncCancel::CODE,
            opcode::PollAdd::CODE,
        ];
        if !needed.iter().all(|&op| probe.is_supported(op)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks recvmsg, send, cancel or poll",
            ));
        }
        let buffers = Buffers::new()?;
        // SAFETY: the entries stay allocated until after the ring is
        // unregistered (`Drop for Ring`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                buffers.entries.as_ptr() as u64,
                BUFFERS,
                GROUP,
                0,
            )?;
        }
        // SAFETY: an all-zero msghdr is valid (no name, no control).
        let mut header: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        header.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // The table may not exceed the open-file limit; without one, or
        // past its end, sockets are used by descriptor.
        let table = u32::try_from(sockets.min(crate::limits::open_files())).unwrap_or(u32::MAX);
        let fixed = match ring.submitter().register_files_sparse(table) {
            Ok(()) => (0..table).rev().collect(),
            Err(e) => {
                tracing::info!(error = %e, "media relay: no io_uring file table");
                Vec::new()
            }
        };
        let mut ring = Self {
            ring,
            buffers: ManuallyDrop::new(buffers),
            header,
            sends: (0..BUFFERS).map(|_| None).collect(),
            wake,
            completed: Vec::with_capacity(COMPLETION_ENTRIES as usize),
            queued: Vec::with_capacity(usize::from(BUFFERS)),
            issued: Vec::with_capacity(usize::from(BUFFERS)),
            fixed,
        };
        if !ring.arm_wake() {
            return Err(io::Error::other(
                "io_uring submission queue refused a request",
            ));
        }
        Ok(ring)
    }

    /// Queues a request; false when the ring would not take it.
    fn push(&mut self, entry: squeue::Entry) -> bool {
        for _ in 0..3 {
            // SAFETY: what the entries point at (buffers, the addresses in
            // `sends`, the msghdr) lives until their requests complete.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return true;
            }
            self.submit();
        }
        false
    }

    /// After an entry: once the kernel has taken every queued request,
    /// the queued sends have been issued.
    fn taken(&mut self) {
        if self.ring.submission().is_empty() {
            self.issued.append(&mut self.queued);
        }
    }

    fn arm_wake(&mut self) -> bool {
        let poll = opcode::PollAdd::new(Fd(self.wake), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(WAKE);
        self.push(poll)
    }

    fn arm(&mut self, socket: RawFd, fixed: Option<u32>, token: Token) -> bool {
        let receive = match fixed {
            Some(index) => opcode::RecvMsgMulti::new(Fixed(index), &*self.header, GROUP).build(),
            None => opcode::RecvMsgMulti::new(Fd(socket), &*self.header, GROUP).build(),
        };
        self.push(receive.user_data(RECEIVE | token.encode()))
    }

    /// Puts a socket in the fixed-file table, if there is room.
    fn register(&mut self, socket: RawFd) -> Option<u32> {
        let index = self.fixed.pop()?;
        match self
            .ring
            .submitter()
            .register_files_update(index, &[socket])
        {
            Ok(_) => Some(index),
            Err(e) => {
                tracing::debug!(error = %e, "media relay: socket not in the io_uring file table");
                self.fixed.push(index);
                None
            }
        }
    }

    /// Takes a socket out of the fixed-file table: the table's reference
    /// would otherwise keep it, and its port, open.
    fn unregister(&mut self, index: u32) {
        match self.ring.submitter().register_files_update(index, &[-1]) {
            Ok(_) => self.fixed.push(index),
            Err(e) => tracing::warn!(error = %e, "media relay: io_uring file table update failed"),
        }
    }

    /// Submits what is queued and waits up to `timeout` for `want`
    /// completions; the kernel runs the receives that are due meanwhile.
    fn enter(&mut self, want: usize, timeout: Duration) {
        let timespec = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&timespec);
        let entered = self.ring.submitter().submit_with_args(want, &args);
        self.entered(entered);
    }

    /// After an entry: settles what the kernel took, and reports an error
    /// other than a timeout or an interruption.
    fn entered(&mut self, result: io::Result<usize>) {
        self.taken();
        if let Err(e) = result {
            if !matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
            ) {
                tracing::warn!(error = %e, "media relay: io_uring_enter failed");
                // Not a hot loop on an error that persists.
                std::thread::sleep(super::TICK);
            }
        }
    }

    fn submit(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        let submitted = self.ring.submit();
        self.taken();
        if let Err(e) = submitted {
            tracing::warn!(error = %e, "media relay: io_uring submit failed");
        }
    }

    /// Submits what is queued and runs the receives that are due, without
    /// waiting: cheaper than a wait with a timeout that has already run out.
    fn gather(&mut self) {
        let queued = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
        // SAFETY: no argument structure is passed.
        let entered = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(queued, 0, GETEVENTS, None)
        };
        self.entered(entered);
    }

    /// Handles what completed: forwards received packets (their sends are
    /// queued for the next entry), and settles the sends issued.
    /// Returns the packets received and the packets sent.
    fn complete(&mut self, thread: &mut Thread, now: Instant) -> (u64, u64) {
        // Collected first: handling a completion queues submissions, and
        // both queues borrow the ring.
        let mut completed = std::mem::take(&mut self.completed);
        completed.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let (mut received, mut sent) = (0, 0);
        for &(user_data, result, flags) in &completed {
            match user_data & TAG {
                RECEIVE => {
                    received += u64::from(self.received(thread, user_data, result, flags, now));
                }
                SEND => {
                    let bid = usize::try_from(user_data & 0xFFFF).unwrap_or(usize::MAX);
                    if let Some(Some(flight)) = self.sends.get_mut(bid) {
                        flight.failed = result < 0;
                    }
                }
                WAKE => {
                    drain_eventfd(self.wake);
                    if !cqueue::more(flags) && !self.arm_wake() {
                        tracing::error!("media relay cannot hear signalling any more");
                    }
                }
                _ => {}
            }
        }
        completed.clear();
        self.completed = completed;
        for bid in std::mem::take(&mut self.issued) {
            sent += u64::from(self.settle(thread, bid));
        }
        self.buffers.publish();
        (received, sent)
    }

    /// One completion of a socket's multishot receive; true when it
    /// brought a packet that is now queued to go out.
    fn received(
        &mut self,
        thread: &mut Thread,
        user_data: u64,
        result: i32,
        flags: u32,
        now: Instant,
    ) -> bool {
        let token = Token::decode(user_data & !TAG);
        let buffer = cqueue::buffer_select(flags);
        let mut queued = false;
        if let Some(bid) = buffer {
            if let Ok(len) = usize::try_from(result) {
                queued = self.forward(thread, token, bid, len, now);
            }
            if !queued {
                self.buffers.give_back(bid);
            }
        }
        if !cqueue::more(flags) {
            // The receive ended: out of buffers or done with data: armed
            // again. Cancelled as the call ended, or failed: let go.
            let socket = thread.input(token).map(AsRawFd::as_raw_fd);
            let fixed = thread.hold(token).fixed;
            let again = result >= 0 || result == -libc::ENOBUFS;
            match socket {
                Some(socket) if again && self.arm(socket, fixed, token) => {}
                // Still used for sending: stays in the file table until
                // the call ends.
                Some(_) => {
                    tracing::warn!(error = %io::Error::from_raw_os_error(-result), "media relay: receive failed");
                    thread.let_go(token);
                }
                None => {
                    if let Some(index) = fixed {
                        self.unregister(index);
                    }
                    thread.let_go(token);
                }
            }
        }
        queued
    }

    /// Queues the packet in buffer `bid` (`len` bytes as the kernel wrote
    /// them) to where its stream sends it; false when it is dropped.
    fn forward(
        &mut self,
        thread: &mut Thread,
        token: Token,
        bid: u16,
        len: usize,
        now: Instant,
    ) -> bool {
        let Some(data) = self.buffers.get(bid, len) else {
            return false;
        };
        let Ok(message) = RecvMsgOut::parse(data, &self.header) else {
            return false;
        };
        if message.is_payload_truncated() {
            thread.failed(token);
            return false;
        }
        let (Some(source), payload) = (socket_address(message.name_data()), message.payload_data())
        else {
            return false;
        };
        let (start, length) = (payload.as_ptr(), payload.len());
        let Some(destination) = thread.route(token, source, now) else {
            return false;
        };
        let (Some((socket, hold)), Ok(length_u32)) = (thread.output(token), u32::try_from(length))
        else {
            return false;
        };
        let send = match hold.fixed {
            Some(index) => opcode::Send::new(Fixed(index), start, length_u32),
            None => opcode::Send::new(Fd(socket.as_raw_fd()), start, length_u32),
        };
        let Some(flight) = self.sends.get_mut(usize::from(bid)) else {
            return false;
        };
        let flight = flight.insert(InFlight {
            token,
            len: length,
            address: SockAddr::from(destination),
            failed: false,
        });
        let send = send
            .dest_addr(flight.address.as_ptr().cast())
            .dest_addr_len(flight.address.len())
            .flags(libc::MSG_DONTWAIT)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(SEND | u64::from(bid));
        if self.push(send) {
            self.queued.push(bid);
            return true;
        }
        self.sends.get_mut(usize::from(bid)).map(Option::take);
        thread.failed(token);
        false
    }

    /// An issued send is over: its buffer goes back; true when the packet
    /// went out.
    fn settle(&mut self, thread: &Thread, bid: u16) -> bool {
        let flight = self.sends.get_mut(usize::from(bid)).and_then(Option::take);
        self.buffers.give_back(bid);
        match flight {
            Some(flight) if !flight.failed => {
                thread.sent(flight.token, flight.len);
                true
            }
            Some(flight) => {
                thread.failed(flight.token);
                false
            }
            None => false,
        }
    }
}

impl Watch for Ring {
    fn watch(&mut self, socket: RawFd, token: Token) -> Hold {
        let fixed = self.register(socket);
        if self.arm(socket, fixed, token) {
            return Hold {
                pending: true,
                fixed,
            };
        }
        tracing::error!("media relay cannot watch a socket");
        Hold {
            pending: false,
            fixed,
        }
    }

    /// A pending receive is cancelled; its last completion lets the socket
    /// go. A socket with none leaves the file table at once.
    fn unwatch(&mut self, _socket: RawFd, token: Token, hold: Hold) {
        if hold.pending {
            let cancel = opcode::AsyncCancel::new(RECEIVE | token.encode())
                .build()
                .user_data(CANCEL);
            if self.push(cancel) {
                return;
            }
            tracing::warn!("media relay could not cancel a receive");
        }
        if let Some(index) = hold.fixed {
            self.unregister(index);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Until its requests end the kernel may write into the buffers
        // (receives) or read from them (queued sends): issue what is
        // queued, cancel every receive, and free the memory only once the
        // buffer ring is unregistered.
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(CANCEL);
        self.push(cancel);
        self.submit();
        let unregistered = self.ring.submitter().unregister_buf_ring(GROUP).is_ok();
        if unregistered && self.queued.is_empty() {
            // SAFETY: dropped once, here; the kernel no longer uses it.
            unsafe { ManuallyDrop::drop(&mut self.buffers) };
        } else {
            tracing::warn!("media relay: io_uring buffers left allocated at exit");
        }
    }
}

/// Runs the thread's rounds until signalling goes away.
pub(super) fn run(mut thread: Thread, mut ring: Ring) {
    let mut received = 0;
    let mut start = Instant::now();
    'rounds: loop {
        match thread.pause(received > 0, start) {
            // Packets arriving during the sleep wait in the ring.
            Some(rest) => {
                ring.submit();
                std::thread::sleep(rest);
            }
            None => {
                ring.enter(1, SWEEP_EVERY);
                // A busy thread woken by the first packets of a burst lets
                // the rest arrive, and serves them all in one round.
                if thread.busy {
                    std::thread::sleep(super::TICK);
                }
            }
        }
        let now = Instant::now();
        start = now;
        // The kernel runs a limited number of receives per entry, and the
        // sends a pass queues go out with the next entry: enter until a
        // pass brings nothing.
        let (mut sent, mut passes) = (0, 0);
        received = 0;
        loop {
            ring.gather();
            // Commands between receiving and routing: a command queued
            // before a packet was sent (the SDP that tells where it goes,
            // or that the phone moved) is applied before that packet is
            // routed.
            if !thread.commands(&mut ring) {
                break 'rounds;
            }
            let (r, s) = ring.complete(&mut thread, now);
            (received, sent, passes) = (received + r, sent + s, passes + 1);
            if r + s == 0 || passes > MAX_PASSES {
                break;
            }
        }
        if !thread.end_round(sent, now, &mut ring) {
            break;
        }
    }
    thread.shutdown(&mut ring);
}

/// The address in a `sockaddr_in` or `sockaddr_in6` as the kernel wrote it.
fn socket_address(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_ne_bytes(name.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(addr: SocketAddr) -> Vec<u8> {
        let raw = SockAddr::from(addr);
        let len = usize::try_from(raw.len()).expect("length");
        // SAFETY: `raw` holds `len` initialised bytes of its sockaddr.
        unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), len) }.to_vec()
    }

    #[test]
    fn source_addresses_read_as_the_kernel_wrote_them() {
        for text in [
            "192.0.2.7:40000",
            "[2001:db8::9]:40002",
            "[::ffff:192.0.2.7]:5",
        ] {
            let addr: SocketAddr = text.parse().expect("literal");
            assert_eq!(socket_address(&bytes_of(addr)), Some(addr));
        }
        let v4 = bytes_of("192.0.2.7:40000".parse().expect("literal"));
        assert_eq!(socket_address(&v4[..6]), None, "cut short");
        assert_eq!(socket_address(&[0; 16]), None, "unknown family");
    }
}
