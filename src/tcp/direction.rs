//! One direction of a TCP connection: source socket -> pipe -> destination socket.
//!
//! The direction owns a pipe only while bytes are in it, counts those bytes
//! itself (so EAGAIN can be read as "pipe full" or "socket drained"), and
//! forwards the source's EOF as a FIN once the pipe is empty. Without a pipe
//! (none to be had, or splice refused) it copies through a pooled buffer
//! instead, with the same state machine. ARCHITECTURE.md, "Invariants",
//! names the rules this file keeps.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;

use mio::net::TcpStream;

use super::pipe_pool::{Pipe, PipePool};
use crate::sys;

/// A socket and the readiness the event loop has seen on it (mio is
/// edge-triggered: a flag is cleared only by EAGAIN).
pub(crate) struct Side {
    /// The socket.
    pub(crate) sock: TcpStream,
    /// Data or EOF may be waiting to be read.
    pub(crate) readable: bool,
    /// The send buffer may have room.
    pub(crate) writable: bool,
    /// The peer's FIN was seen (EPOLLRDHUP).
    pub(crate) read_closed: bool,
    /// Urgent data was seen (EPOLLPRI) at some point: a 0 from splice may be
    /// an urgent mark rather than the end of the stream.
    pub(crate) urgent: bool,
    /// An error or hang-up edge was seen: a pending connect may have failed.
    pub(crate) faulted: bool,
}

impl Side {
    /// A side with no readiness seen yet.
    pub(crate) fn new(sock: TcpStream) -> Self {
        Side { sock, readable: false, writable: false, read_closed: false, urgent: false, faulted: false }
    }

    /// Records what an event says. A hang-up or error only marks the socket
    /// ready: the next syscall reports it, after the bytes before it were read.
    pub(crate) fn note(&mut self, ev: &mio::event::Event) {
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.readable = true;
        }
        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
            self.writable = true;
        }
        if ev.is_read_closed() {
            self.read_closed = true;
        }
        if ev.is_priority() {
            self.urgent = true;
        }
        if ev.is_error() || ev.is_write_closed() || ev.is_read_closed() {
            self.faulted = true;
        }
    }
}

/// Where a direction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DirState {
    /// Bytes may still come from the source.
    Open,
    /// The source sent EOF; bytes may remain in the pipe.
    ReadEof,
    /// EOF was forwarded: the destination's write side is shut.
    WriteShut,
}

/// The buffer bytes wait in between the two sockets.
enum Channel {
    /// Nothing in flight: no pipe, no buffer held.
    Idle,
    /// A pipe lent by the pool.
    Pipe(Pipe),
    /// A user-space buffer lent by the pool: bytes live in `buf[start..end]`.
    Copy { buf: Box<[u8]>, start: usize, end: usize },
}

/// What one read from the source gave.
enum Got {
    /// Bytes went into the channel.
    Bytes(usize),
    /// The source's stream is over.
    Eof,
    /// The source has nothing now (EAGAIN with an empty channel).
    Drained,
    /// Nothing could be read until the channel drains: EAGAIN with bytes in
    /// the pipe (it may be full), or splice stopped at an urgent mark.
    Stalled,
}

/// One way of a connection, with its in-flight bytes and its state.
pub(crate) struct Direction {
    channel: Channel,
    pending: usize,
    state: DirState,
    splice: bool,
    /// Bytes delivered to the destination so far.
    pub(crate) bytes: u64,
}

/// What one call to [`Direction::pump`] left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pumped {
    /// Bytes written to the destination.
    pub(crate) moved: usize,
    /// The byte budget ran out with work left: call again soon.
    pub(crate) more: bool,
}

impl Direction {
    /// A fresh direction; `splice` false copies through user memory instead.
    pub(crate) fn new(splice: bool) -> Self {
        Direction { channel: Channel::Idle, pending: 0, state: DirState::Open, splice, bytes: 0 }
    }

    /// The state.
    pub(crate) fn state(&self) -> DirState {
        self.state
    }

    fn holds_pipe(&self) -> bool {
        matches!(self.channel, Channel::Pipe(_))
    }

    /// Moves bytes from `src` to `dst` until both would block or `budget`
    /// bytes have been read. Errors are the connection's: the caller aborts it.
    ///
    /// `last`: the other direction has already forwarded its EOF, so the
    /// connection is closed as soon as this one finishes. Its FIN then
    /// comes from `close` (both sockets were read to EOF, so neither holds
    /// unread bytes that would turn the close into a reset), and the
    /// `shutdown` call is skipped.
    pub(crate) fn pump(
        &mut self,
        src: &mut Side,
        dst: &mut Side,
        pool: &mut PipePool,
        budget: usize,
        last: bool,
    ) -> io::Result<Pumped> {
        let mut out = Pumped { moved: 0, more: false };
        let mut read = 0usize;
        loop {
            let mut progress = false;
            // Drain first: the whole pipe, not just the fresh bytes (ARCHITECTURE.md, Pipes).
            if self.pending > 0 && dst.writable {
                match self.write_out(dst) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.pending -= n;
                        self.bytes += n as u64;
                        out.moved += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable = false,
                    Err(e) => return Err(e),
                }
            }
            // FIN only once the pipe is empty (ARCHITECTURE.md, Close and reset).
            if self.state == DirState::ReadEof && self.pending == 0 {
                if !last {
                    match dst.sock.shutdown(Shutdown::Write) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(e) => return Err(e),
                    }
                }
                self.state = DirState::WriteShut;
                progress = true;
            }
            if self.state == DirState::Open && src.readable {
                if read >= budget {
                    out.more = true;
                } else if self.room(pool) > 0 {
                    match self.read_in(src) {
                        Ok(Got::Bytes(n)) => {
                            self.pending += n;
                            read += n;
                            progress = true;
                        }
                        Ok(Got::Eof) => {
                            self.state = DirState::ReadEof;
                            progress = true;
                        }
                        // Only an empty channel proves the socket is drained.
                        Ok(Got::Drained) => src.readable = false,
                        // Progress now depends on the destination taking bytes.
                        Ok(Got::Stalled) => {}
                        Err(e) if self.pending == 0 && sys::splice_unsupported(&e) && self.holds_pipe() => {
                            log::warn!("splice refused ({e}); this connection copies through user memory");
                            self.splice = false;
                            self.release(pool);
                            progress = true;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            if !progress {
                break;
            }
        }
        if self.pending == 0 {
            self.release(pool);
        }
        Ok(out)
    }

    /// Returns the pipe or buffer if nothing is in flight, and always on close.
    pub(crate) fn release(&mut self, pool: &mut PipePool) {
        match std::mem::replace(&mut self.channel, Channel::Idle) {
            Channel::Pipe(p) => pool.give(p, self.pending == 0),
            Channel::Copy { buf, .. } => pool.give_buf(buf),
            Channel::Idle => {}
        }
    }

    /// Free room in the channel, acquiring a pipe or buffer if idle.
    fn room(&mut self, pool: &mut PipePool) -> usize {
        if let Channel::Idle = self.channel {
            self.channel = match self.splice.then(|| pool.take()).flatten() {
                Some(p) => Channel::Pipe(p),
                None => Channel::Copy { buf: pool.take_buf(), start: 0, end: 0 },
            };
        }
        match &mut self.channel {
            Channel::Idle => 0,
            Channel::Pipe(p) => p.capacity().saturating_sub(self.pending),
            Channel::Copy { buf, start, end } => {
                if start == end {
                    (*start, *end) = (0, 0);
                }
                buf.len() - *end
            }
        }
    }

    fn read_in(&mut self, src: &mut Side) -> io::Result<Got> {
        let would_block = |e: &io::Error| e.kind() == io::ErrorKind::WouldBlock;
        match &mut self.channel {
            Channel::Idle => Ok(Got::Stalled),
            Channel::Pipe(p) => {
                // Never more than the free room: a huge length is EINVAL on new kernels.
                let room = p.capacity().saturating_sub(self.pending);
                match sys::splice(src.sock.as_fd(), p.write_end(), room) {
                    // Splice also answers 0 at an urgent mark, with the stream
                    // going on behind it. A FIN seen with no urgent data ever
                    // seen is certain; otherwise, once the pipe is empty, one
                    // recv tells the two apart and steps over the mark (the
                    // urgent byte stays in band: SO_OOBINLINE).
                    Ok(0) if src.read_closed && !src.urgent => Ok(Got::Eof),
                    Ok(0) if self.pending > 0 => Ok(Got::Stalled),
                    Ok(0) => match sys::recv_one(src.sock.as_fd()) {
                        Ok(None) => Ok(Got::Eof),
                        // An empty pipe always takes one byte.
                        Ok(Some(b)) => sys::write(p.write_end(), &[b]).map(Got::Bytes),
                        Err(e) if would_block(&e) => Ok(Got::Drained),
                        Err(e) => Err(e),
                    },
                    Ok(n) => Ok(Got::Bytes(n)),
                    Err(e) if would_block(&e) && self.pending > 0 => Ok(Got::Stalled),
                    Err(e) if would_block(&e) => Ok(Got::Drained),
                    Err(e) => Err(e),
                }
            }
            Channel::Copy { buf, end, .. } => match (&src.sock).read(&mut buf[*end..]) {
                Ok(0) => Ok(Got::Eof),
                Ok(n) => {
                    *end += n;
                    Ok(Got::Bytes(n))
                }
                // A full buffer reads nothing; the room check comes first.
                Err(e) if would_block(&e) => Ok(Got::Drained),
                Err(e) => Err(e),
            },
        }
    }

    fn write_out(&mut self, dst: &mut Side) -> io::Result<usize> {
        match &mut self.channel {
            Channel::Idle => Ok(0),
            Channel::Pipe(p) => sys::splice(p.read_end(), dst.sock.as_fd(), self.pending),
            Channel::Copy { buf, start, end } => {
                let n = (&dst.sock).write(&buf[*start..*end])?;
                *start += n;
                Ok(n)
            }
        }
    }
}
