//! The worker's io_uring: operations in flight and their completions, the
//! multishot receives and accepts a connection or listener keeps armed, and
//! the provided-buffer ring those receives fill.
//!
//! The ring runs beside tokio's reactor on the worker thread: its descriptor
//! sits in tokio's epoll set, one task turns completions into wakes, and
//! queued submissions go to the kernel in one `io_uring_enter` when the
//! thread is about to park. tokio keeps the timers, the Redis and control
//! sockets and the blocking pool.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// Provided buffers per worker at most: enough for every connection that
/// becomes readable in one pass at a thousand connections to be received
/// into. The memory is reserved, not resident: pages are touched as buffers
/// are used and handed back by [`trim`] once none is held.
const BUFFERS: u16 = 1024;
/// Buffers lent to the kernel at first. The kernel takes them in ring order,
/// so every lent buffer's pages end up touched: the ring doubles only when a
/// receive finds it empty, and a worker that never needs more stays at
/// `LENT_FIRST × BUFFER_SIZE` resident (2 MiB).
const LENT_FIRST: u16 = 128;
/// Bytes per provided buffer: a 16 KiB body arrives in one.
const BUFFER_SIZE: usize = 16 * 1024;
/// The buffer group of the worker's one provided-buffer ring.
const GROUP: u16 = 0;
/// Bytes a connection may hold in provided buffers before its multishot
/// receive is cancelled, so a reader that does not keep up leaves the rest
/// in the socket (and TCP's window) rather than in the ring.
const HOLD_MAX: usize = 64 * 1024;
/// The user data of operations whose completion nobody waits for.
const UNWATCHED: u64 = u64::MAX;

thread_local! {
    static DRIVER: RefCell<Option<Rc<Driver>>> = const { RefCell::new(None) };
}

/// The current thread's driver; panics outside [`super::start`].
fn driver() -> Rc<Driver> {
    DRIVER.with(|d| {
        d.borrow()
            .clone()
            .expect("io_uring operations run inside portcullis::proxy::io::start")
    })
}

/// Installs a new driver on this thread; its ring fd is what tokio polls.
pub(super) fn install(entries: u32) -> io::Result<RawFd> {
    let driver = Rc::new(Driver::new(entries)?);
    let fd = driver.ring.borrow().as_raw_fd();
    DRIVER.with(|d| *d.borrow_mut() = Some(driver));
    Ok(fd)
}

/// Removes this thread's driver once every task is gone.
pub(super) fn uninstall() {
    DRIVER.with(|d| d.borrow_mut().take());
}

/// Hands queued submissions to the kernel; tokio calls it before parking.
pub(super) fn flush() {
    DRIVER.with(|d| {
        if let Some(driver) = d.borrow().as_ref() {
            // With the completion queue full, the rest goes after the next dispatch.
            driver.submit();
        }
    });
}

/// Closes `fd` once every entry queued for it has reached the kernel.
pub(super) fn close_later(fd: OwnedFd) {
    DRIVER.with(|d| {
        if let Some(driver) = d.borrow().as_ref() {
            driver.closing.borrow_mut().push(fd);
        }
    });
}

/// Returns the pages of the provided buffers to the kernel when no
/// connection holds one (after the load that touched them has passed).
pub(super) fn trim() {
    let Some(driver) = DRIVER.with(|d| d.borrow().clone()) else {
        return;
    };
    // Completions already posted name buffers the kernel has filled.
    driver.dispatch();
    if let Some(bufs) = &driver.bufs
        && bufs.held.get() == 0
    {
        bufs.discard();
    }
}

/// How many receives on this thread ended because the provided buffers ran out.
#[cfg(test)]
pub(super) fn starved_receives() -> u64 {
    driver().starved.get()
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Turns completions into wakes whenever the ring's descriptor, `ring_fd`
/// from [`install`], is readable; spawned once per thread.
#[expect(
    unsafe_code,
    reason = "registering the ring's descriptor with tokio's reactor"
)]
pub(super) async fn drive(ring_fd: RawFd) {
    // SAFETY: the ring's descriptor stays open until `uninstall`, which runs
    // after the runtime and this task are gone.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring_fd, tokio::io::Interest::READABLE) };
    let readiness = registered.expect("the ring's descriptor joins the reactor");
    loop {
        let Ok(mut ready) = readiness.readable().await else {
            return;
        };
        driver().dispatch();
        ready.clear_ready();
    }
}

/// What one entry of the operation table stands for.
enum Slot {
    Vacant(usize),
    /// A one-shot operation whose future waits.
    Waiting(Option<Waker>),
    /// A one-shot operation completed before its future looked again.
    Done(i32),
    /// A one-shot operation whose future was dropped: what the kernel may
    /// still write to or read from lives here until the completion.
    Orphaned(#[expect(dead_code, reason = "held only to be dropped at completion")] Box<dyn Any>),
    /// A connection's multishot receive into provided buffers.
    Recv(Rc<Inbox>),
    /// A listener's accept.
    Accept(Rc<Arrivals>),
}

struct Driver {
    ring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    vacant: Cell<usize>,
    bufs: Option<BufRing>,
    /// Whether this kernel has multishot receive and accept (6.0).
    multishot: Cell<bool>,
    completed: RefCell<Vec<(u64, i32, u32)>>,
    /// Receives ended because the provided buffers had run out.
    starved: Cell<u64>,
    /// Descriptors closed after the next submit, so an entry still queued
    /// for one cannot reach a socket that reuses its number.
    closing: RefCell<Vec<OwnedFd>>,
}

impl Driver {
    fn new(entries: u32) -> io::Result<Self> {
        let ring = build_ring(entries)?;
        let bufs = BufRing::new(&ring).ok();
        Ok(Self {
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::new()),
            vacant: Cell::new(usize::MAX),
            multishot: Cell::new(bufs.is_some() && kernel_at_least(6, 0)),
            bufs,
            completed: RefCell::new(Vec::new()),
            starved: Cell::new(0),
            closing: RefCell::new(Vec::new()),
        })
    }

    fn insert(&self, slot: Slot) -> usize {
        let mut slots = self.slots.borrow_mut();
        let index = self.vacant.get();
        if index < slots.len() {
            let Slot::Vacant(next) = std::mem::replace(&mut slots[index], slot) else {
                unreachable!("the vacant list holds vacant slots only");
            };
            self.vacant.set(next);
            index
        } else {
            slots.push(slot);
            slots.len() - 1
        }
    }

    fn remove(&self, index: usize) -> Slot {
        let slot = std::mem::replace(
            &mut self.slots.borrow_mut()[index],
            Slot::Vacant(self.vacant.get()),
        );
        self.vacant.set(index);
        slot
    }

    /// Queues `entry` for a new slot holding `slot`; returns the slot's index.
    fn start(&self, slot: Slot, entry: squeue::Entry) -> usize {
        let index = self.insert(slot);
        self.push(&entry.user_data(index as u64));
        index
    }

    /// Queues `entry`; the kernel sees it at the next [`Self::submit`].
    #[expect(unsafe_code, reason = "the ring's submission queue takes raw pointers")]
    fn push(&self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every entry's buffers are owned by its slot or its
            // future's `keep`, which outlive the operation (see `Op`'s drop).
            if unsafe { self.ring.borrow_mut().submission().push(entry) }.is_ok() {
                return;
            }
            // The submission queue is full: hand it to the kernel now, and
            // make room in the completion queue if that is what stops it.
            if !self.submit() {
                self.dispatch();
            }
        }
    }

    /// Hands every queued entry to the kernel; false when it took none
    /// because the completion queue is full (`EBUSY`).
    #[expect(unsafe_code, reason = "reading the submission queue's length")]
    fn submit(&self) -> bool {
        let ring = self.ring.borrow();
        // SAFETY: reading the queue length only.
        let queued = unsafe { ring.submission_shared().len() };
        let taken = queued == 0
            || match ring.submit() {
                Ok(_) => true,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => false,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring submit failed");
                    true
                }
            };
        drop(ring);
        if taken {
            self.closing.borrow_mut().clear();
        }
        taken
    }

    fn dispatch(&self) {
        let mut completed = std::mem::take(&mut *self.completed.borrow_mut());
        {
            let mut ring = self.ring.borrow_mut();
            completed.extend(ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        }
        for (user_data, result, flags) in completed.drain(..) {
            if user_data != UNWATCHED {
                self.complete(usize::try_from(user_data).unwrap_or(usize::MAX), result, flags);
            }
        }
        *self.completed.borrow_mut() = completed;
    }

    fn complete(&self, index: usize, result: i32, flags: u32) {
        let last = !cqueue::more(flags);
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(index) else { return };
        match slot {
            Slot::Waiting(waker) => {
                let waker = waker.take();
                *slot = Slot::Done(result);
                drop(slots);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Slot::Orphaned(_) => {
                drop(slots);
                drop(self.remove(index));
            }
            Slot::Recv(inbox) => {
                let inbox = inbox.clone();
                drop(slots);
                if last {
                    self.remove(index);
                }
                inbox.on_completion(self, index, result, flags, last);
            }
            Slot::Accept(arrivals) => {
                let arrivals = arrivals.clone();
                drop(slots);
                if last {
                    self.remove(index);
                }
                arrivals.on_completion(result, last);
            }
            Slot::Vacant(_) | Slot::Done(_) => {}
        }
    }

    /// Asks the kernel to end the operation in `index` early.
    fn cancel(&self, index: usize) {
        let entry = opcode::AsyncCancel::new(index as u64)
            .build()
            .user_data(UNWATCHED);
        self.push(&entry);
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let in_flight = self
            .slots
            .get_mut()
            .iter()
            .any(|slot| !matches!(slot, Slot::Vacant(_) | Slot::Done(_)));
        if in_flight {
            // The kernel may still write into what in-flight operations
            // hold; the thread is ending, so that memory is left to it.
            for slot in self.slots.get_mut().drain(..) {
                std::mem::forget(slot);
            }
            if let Some(bufs) = self.bufs.take() {
                std::mem::forget(bufs);
            }
        }
    }
}

/// A ring with one submitter whose completions run when the worker next
/// enters the kernel instead of interrupting it (`SINGLE_ISSUER`,
/// `COOP_TASKRUN`, 6.0), or a plain ring on older kernels.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let mut tuned = IoUring::builder();
    tuned
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_submit_all();
    tuned.build(entries).or_else(|_| IoUring::new(entries))
}

/// A one-shot operation: resolves to the kernel's result and `keep`, the
/// buffers it used, handed back.
pub(super) struct Op<T: 'static> {
    index: usize,
    keep: Option<T>,
}

impl<T: 'static> Op<T> {
    /// Queues `entry`, whose memory lies in `keep`.
    pub(super) fn new(entry: squeue::Entry, keep: T) -> Self {
        let index = driver().start(Slot::Waiting(None), entry);
        Self {
            index,
            keep: Some(keep),
        }
    }
}

impl<T: 'static> Unpin for Op<T> {}

impl<T: 'static> Future for Op<T> {
    type Output = (i32, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let driver = driver();
        let mut slots = driver.slots.borrow_mut();
        match &mut slots[self.index] {
            Slot::Done(result) => {
                let result = *result;
                drop(slots);
                driver.remove(self.index);
                let keep = self.keep.take().expect("an operation completes once");
                Poll::Ready((result, keep))
            }
            Slot::Waiting(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            _ => unreachable!("a one-shot operation's slot is waiting or done"),
        }
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let Some(keep) = self.keep.take() else { return };
        let Some(driver) = DRIVER.with(|d| d.borrow().clone()) else {
            // The thread's driver is gone: the ring is closed, nothing writes here.
            return;
        };
        let mut slots = driver.slots.borrow_mut();
        if matches!(slots[self.index], Slot::Done(_)) {
            drop(slots);
            driver.remove(self.index);
        } else {
            slots[self.index] = Slot::Orphaned(Box::new(keep));
        }
    }
}

/// Whether a multishot operation is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Idle,
    Armed(usize),
    Cancelling,
}

/// A filled provided buffer a connection has not read yet.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    bid: u16,
    start: usize,
    end: usize,
}

/// What a connection's receive brought and its reader has not taken.
#[derive(Debug)]
pub(super) struct Inbox {
    chunks: RefCell<VecDeque<Chunk>>,
    held: Cell<usize>,
    /// The stream's end once seen: 0 for EOF, a negative errno for an error.
    end: Cell<Option<i32>>,
    arm: Cell<Arm>,
    /// The last receive found the buffer ring empty: the next read goes
    /// straight into the reader's buffer.
    starved: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Inbox {
    pub(super) fn new() -> Rc<Self> {
        Rc::new(Self {
            chunks: RefCell::new(VecDeque::new()),
            held: Cell::new(0),
            end: Cell::new(None),
            arm: Cell::new(Arm::Idle),
            starved: Cell::new(false),
            waker: RefCell::new(None),
        })
    }

    fn on_completion(&self, driver: &Driver, index: usize, result: i32, flags: u32, last: bool) {
        let bid = cqueue::buffer_select(flags);
        if let (Some(_), Some(bufs)) = (bid, &driver.bufs) {
            bufs.filled();
        }
        match (result, bid) {
            (n, Some(bid)) if n > 0 => {
                let len = usize::try_from(n).unwrap_or(0);
                self.chunks.borrow_mut().push_back(Chunk {
                    bid,
                    start: 0,
                    end: len,
                });
                self.held.set(self.held.get() + len);
                if !last && self.held.get() >= HOLD_MAX && self.arm.get() == Arm::Armed(index) {
                    driver.cancel(index);
                    self.arm.set(Arm::Cancelling);
                }
            }
            (n, bid) => {
                if let (Some(bid), Some(bufs)) = (bid, &driver.bufs) {
                    bufs.recycle(bid);
                }
                match -n {
                    0 => self.end.set(Some(0)),
                    libc::ENOBUFS => {
                        self.starved.set(true);
                        driver.starved.set(driver.starved.get() + 1);
                        // Only a connection within its hold limit shows the ring is
                        // short: one over it took the buffers faster than its
                        // cancel reached the kernel.
                        if let Some(bufs) = &driver.bufs
                            && self.held.get() < HOLD_MAX
                        {
                            bufs.grow();
                        }
                    }
                    libc::ECANCELED => {}
                    _ => self.end.set(Some(n)),
                }
            }
        }
        if last {
            self.arm.set(Arm::Idle);
        }
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Moves received bytes into the spare capacity of `buf`; 0 when none wait.
    fn take_into(&self, bufs: &BufRing, buf: &mut Vec<u8>) -> usize {
        let mut chunks = self.chunks.borrow_mut();
        let mut taken = 0;
        while let Some(chunk) = chunks.front_mut() {
            let room = buf.capacity() - buf.len();
            if room == 0 {
                break;
            }
            let n = room.min(chunk.end - chunk.start);
            buf.extend_from_slice(&bufs.bytes(chunk.bid)[chunk.start..chunk.start + n]);
            chunk.start += n;
            taken += n;
            if chunk.start == chunk.end {
                bufs.recycle(chunk.bid);
                chunks.pop_front();
            }
        }
        self.held.set(self.held.get() - taken);
        taken
    }

    /// Whether nothing waits to be read, no end was seen, and a receive is
    /// armed to report one; `None` when no receive is armed to know.
    pub(super) fn idle_and_open(&self) -> Option<bool> {
        if !self.chunks.borrow().is_empty() || self.end.get().is_some() {
            return Some(false);
        }
        matches!(self.arm.get(), Arm::Armed(_)).then_some(true)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let chunks = std::mem::take(self.chunks.get_mut());
        if chunks.is_empty() {
            return;
        }
        DRIVER.with(|d| {
            if let Some(bufs) = d.borrow().as_ref().and_then(|d| d.bufs.as_ref()) {
                for chunk in chunks {
                    bufs.recycle(chunk.bid);
                }
            }
        });
    }
}

/// Reads from `fd` into the spare capacity of `buf`: from what the armed
/// receive brought, arming it when idle, or straight into `buf` when the
/// provided buffers ran out.
pub(super) async fn recv(fd: RawFd, inbox: &Rc<Inbox>, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
    if buf.capacity() == buf.len() {
        buf.reserve(4096);
    }
    let driver = driver();
    loop {
        if let Some(bufs) = &driver.bufs {
            let n = inbox.take_into(bufs, &mut buf);
            if n > 0 {
                return (Ok(n), buf);
            }
        }
        match inbox.end.get() {
            Some(0) => return (Ok(0), buf),
            Some(errno) => return (Err(io::Error::from_raw_os_error(-errno)), buf),
            None => {}
        }
        if inbox.arm.get() == Arm::Idle {
            if inbox.starved.replace(false) || !driver.multishot.get() {
                return recv_once(fd, buf).await;
            }
            let entry = opcode::RecvMulti::new(types::Fd(fd), GROUP).build();
            let index = driver.start(Slot::Recv(inbox.clone()), entry);
            inbox.arm.set(Arm::Armed(index));
        }
        std::future::poll_fn(|cx| {
            let waiting =
                inbox.chunks.borrow().is_empty() && inbox.end.get().is_none() && inbox.arm.get() != Arm::Idle;
            if waiting {
                *inbox.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }
}

/// One receive straight into the spare capacity of `buf`.
#[expect(unsafe_code, reason = "a receive into a buffer's spare capacity")]
async fn recv_once(fd: RawFd, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
    let len = buf.len();
    let room = u32::try_from(buf.capacity() - len).unwrap_or(u32::MAX);
    // SAFETY: the pointer is to `buf`'s spare capacity, which `Op` keeps alive.
    let at = unsafe { buf.as_mut_ptr().add(len) };
    let entry = opcode::Recv::new(types::Fd(fd), at, room).build();
    let (result, mut buf) = Op::new(entry, buf).await;
    match usize::try_from(result) {
        Ok(n) => {
            // SAFETY: the kernel initialised these `n` bytes of spare capacity.
            unsafe { buf.set_len(len + n) };
            (Ok(n), buf)
        }
        Err(_) => (Err(io::Error::from_raw_os_error(-result)), buf),
    }
}

/// Sends all of `buf` on `fd`.
#[expect(unsafe_code, reason = "a send from a pointer into a kept buffer")]
pub(super) async fn send_all(fd: RawFd, mut buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let mut sent = 0;
    while sent < buf.len() {
        let rest = u32::try_from(buf.len() - sent).unwrap_or(u32::MAX);
        // SAFETY: the pointer is into `buf`, which `Op` keeps alive.
        let at = unsafe { buf.as_ptr().add(sent) };
        let entry = opcode::Send::new(types::Fd(fd), at, rest)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        let (result, back) = Op::new(entry, buf).await;
        buf = back;
        match usize::try_from(result) {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
            Ok(n) => sent += n,
            Err(_) if result == -libc::EINTR => {}
            Err(_) => return (Err(io::Error::from_raw_os_error(-result)), buf),
        }
    }
    (Ok(()), buf)
}

/// Connections a listener's accept brought and nobody took yet.
#[derive(Debug)]
pub(super) struct Arrivals {
    ready: RefCell<VecDeque<io::Result<OwnedFd>>>,
    arm: Cell<Arm>,
    waiters: RefCell<Vec<Waker>>,
}

impl Arrivals {
    pub(super) fn new() -> Rc<Self> {
        Rc::new(Self {
            ready: RefCell::new(VecDeque::new()),
            arm: Cell::new(Arm::Idle),
            waiters: RefCell::new(Vec::new()),
        })
    }

    #[expect(unsafe_code, reason = "adopting an accepted descriptor")]
    fn on_completion(&self, result: i32, last: bool) {
        if result >= 0 {
            // SAFETY: a successful accept's result is a new descriptor this process owns.
            let fd = unsafe { OwnedFd::from_raw_fd(result) };
            self.ready.borrow_mut().push_back(Ok(fd));
        } else if result != -libc::ECANCELED {
            self.ready
                .borrow_mut()
                .push_back(Err(io::Error::from_raw_os_error(-result)));
        }
        if last {
            self.arm.set(Arm::Idle);
        }
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Ends the armed accept, if any; the listener is going away.
    pub(super) fn disarm(&self) {
        if let Arm::Armed(index) = self.arm.get()
            && let Some(driver) = DRIVER.with(|d| d.borrow().clone())
        {
            driver.cancel(index);
            self.arm.set(Arm::Cancelling);
        }
    }
}

/// The next connection on listening socket `fd`, from its multishot accept.
pub(super) async fn accept(fd: RawFd, arrivals: &Rc<Arrivals>) -> io::Result<OwnedFd> {
    loop {
        if let Some(next) = arrivals.ready.borrow_mut().pop_front() {
            return next;
        }
        if arrivals.arm.get() == Arm::Idle {
            let driver = driver();
            let entry = if driver.multishot.get() {
                opcode::AcceptMulti::new(types::Fd(fd))
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
            } else {
                opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
            };
            let index = driver.start(Slot::Accept(arrivals.clone()), entry);
            arrivals.arm.set(Arm::Armed(index));
        }
        std::future::poll_fn(|cx| {
            if arrivals.ready.borrow().is_empty() {
                arrivals.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }
}

/// The worker's provided buffers and the ring that lends them to the kernel.
struct BufRing {
    /// The ring's entries (page aligned, `BUFFERS` of them).
    entries: *mut types::BufRingEntry,
    /// `BUFFERS × BUFFER_SIZE` bytes the entries point into.
    memory: *mut u8,
    tail: Cell<u16>,
    /// Buffers the kernel filled that are not lent again yet.
    held: Cell<usize>,
    /// Buffers `0..lent` are the ones ever lent; the rest are not touched.
    lent: Cell<u16>,
}

impl BufRing {
    #[expect(unsafe_code, reason = "registering memory the kernel writes")]
    fn new(ring: &IoUring) -> io::Result<Self> {
        let entries_len = usize::from(BUFFERS) * std::mem::size_of::<types::BufRingEntry>();
        // A mapping is page aligned, more than an entry needs.
        #[expect(clippy::cast_ptr_alignment, reason = "mmap(2) returns page-aligned memory")]
        let entries = map(entries_len)?.cast::<types::BufRingEntry>();
        let memory = match map(usize::from(BUFFERS) * BUFFER_SIZE) {
            Ok(memory) => memory,
            Err(e) => {
                unmap(entries.cast(), entries_len);
                return Err(e);
            }
        };
        let bufs = Self {
            entries,
            memory,
            tail: Cell::new(0),
            held: Cell::new(0),
            lent: Cell::new(0),
        };
        // SAFETY: `entries` is a page-aligned mapping of `BUFFERS` entries
        // that lives as long as the ring (or is leaked with it).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, BUFFERS, GROUP, 0)
        }?;
        bufs.grow();
        Ok(bufs)
    }

    /// Lends the kernel as many buffers again as it has (`LENT_FIRST` at
    /// first), up to `BUFFERS`.
    fn grow(&self) {
        let lent = self.lent.get();
        let more = if lent == 0 {
            LENT_FIRST
        } else {
            lent.min(BUFFERS - lent)
        };
        self.held.set(self.held.get() + usize::from(more));
        self.lent.set(lent + more);
        for bid in lent..lent + more {
            self.recycle(bid);
        }
    }

    /// Lends buffer `bid` to the kernel again.
    #[expect(unsafe_code, reason = "writing an entry of the ring shared with the kernel")]
    fn recycle(&self, bid: u16) {
        self.held.set(self.held.get() - 1);
        let tail = self.tail.get();
        // SAFETY: the index is masked into the mapping, which only this thread writes.
        let entry = unsafe { &mut *self.entries.add(usize::from(tail & (BUFFERS - 1))) };
        // SAFETY: `bid` < BUFFERS, so the address is inside `memory`.
        entry.set_addr(unsafe { self.memory.add(usize::from(bid) * BUFFER_SIZE) } as u64);
        entry.set_len(u32::try_from(BUFFER_SIZE).expect("a buffer's size fits a u32"));
        entry.set_bid(bid);
        let tail = tail.wrapping_add(1);
        self.tail.set(tail);
        // SAFETY: the tail field of the first entry, shared with the kernel,
        // is published with release ordering after the entry is written.
        unsafe {
            (*types::BufRingEntry::tail(self.entries).cast::<AtomicU16>()).store(tail, Ordering::Release);
        };
    }

    /// Notes that the kernel filled buffer `bid` (a completion named it).
    fn filled(&self) {
        self.held.set(self.held.get() + 1);
    }

    /// Drops the contents of every buffer, all of them lent: the kernel
    /// maps zeroed pages as it next fills them. One call, so no completion
    /// can run between two parts of it.
    #[expect(unsafe_code, reason = "madvise(2) of our own mapping")]
    fn discard(&self) {
        // SAFETY: the mapping is ours and no buffer in it holds unread data.
        unsafe {
            libc::madvise(
                self.memory.cast(),
                usize::from(BUFFERS) * BUFFER_SIZE,
                libc::MADV_DONTNEED,
            )
        };
    }

    /// Buffer `bid`'s bytes.
    #[expect(unsafe_code, reason = "reading a buffer the kernel filled")]
    fn bytes(&self, bid: u16) -> &[u8] {
        // SAFETY: the buffer lies inside `memory`; the kernel wrote it
        // before posting the completion and does not touch it until recycled.
        unsafe { std::slice::from_raw_parts(self.memory.add(usize::from(bid) * BUFFER_SIZE), BUFFER_SIZE) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        unmap(
            self.entries.cast(),
            usize::from(BUFFERS) * std::mem::size_of::<types::BufRingEntry>(),
        );
        unmap(self.memory, usize::from(BUFFERS) * BUFFER_SIZE);
    }
}

#[expect(unsafe_code, reason = "mmap(2)")]
fn map(len: usize) -> io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping; no existing memory is affected.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(at.cast())
    }
}

#[expect(unsafe_code, reason = "munmap(2)")]
fn unmap(at: *mut u8, len: usize) {
    // SAFETY: `at` and `len` are those of a mapping made by `map`, unmapped once.
    unsafe { libc::munmap(at.cast(), len) };
}
