//! One direction of a TCP connection: source socket -> pipe -> destination socket.
//!
//! The direction owns a pipe only while bytes are in it, counts those bytes
//! itself (DATAPATH rule 3), and forwards the source's EOF as a FIN once the
//! pipe is empty (rule 6). Without a pipe (none to be had, or splice refused)
//! it copies through a small buffer instead, with the same state machine.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;

use mio::net::TcpStream;

use super::pipe_pool::{Pipe, PipePool};
use crate::sys;

/// Size of the copy buffer used when no pipe is available or splice is off.
pub const COPY_BUF: usize = 16 * 1024;

/// A socket and the readiness the event loop has seen on it (mio is
/// edge-triggered: a flag is cleared only by EAGAIN, rule 4).
pub struct Side {
    /// The socket.
    pub sock: TcpStream,
    /// Data or EOF may be waiting to be read.
    pub readable: bool,
    /// The send buffer may have room.
    pub writable: bool,
    /// An error or hang-up edge was seen: a pending connect may have failed.
    pub faulted: bool,
}

impl Side {
    /// A side with no readiness seen yet.
    pub fn new(sock: TcpStream) -> Self {
        Side { sock, readable: false, writable: false, faulted: false }
    }
}

/// Where a direction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirState {
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
    /// A user-space buffer: bytes live in `buf[start..end]`.
    Copy { buf: Box<[u8]>, start: usize, end: usize },
}

/// One way of a connection, with its in-flight bytes and its state.
pub struct Direction {
    channel: Channel,
    pending: usize,
    state: DirState,
    splice: bool,
    /// Bytes delivered to the destination so far.
    pub bytes: u64,
}

/// What one call to [`Direction::pump`] left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pumped {
    /// Bytes written to the destination.
    pub moved: usize,
    /// The byte budget ran out with work left: call again soon.
    pub more: bool,
    /// The state changed (EOF read or FIN sent).
    pub changed: bool,
}

impl Direction {
    /// A fresh direction; `splice` false copies through user memory instead.
    pub fn new(splice: bool) -> Self {
        Direction { channel: Channel::Idle, pending: 0, state: DirState::Open, splice, bytes: 0 }
    }

    /// The state.
    pub fn state(&self) -> DirState {
        self.state
    }

    /// Bytes read from the source and not yet written.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// True if this direction holds a pipe now.
    pub fn holds_pipe(&self) -> bool {
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
    pub fn pump(
        &mut self,
        src: &mut Side,
        dst: &mut Side,
        pool: &mut PipePool,
        budget: usize,
        last: bool,
    ) -> io::Result<Pumped> {
        let mut out = Pumped { moved: 0, more: false, changed: false };
        let mut read = 0usize;
        loop {
            let mut progress = false;
            // Drain first: the whole pipe, not just the fresh bytes (rule 5).
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
            // FIN only once the pipe is empty (rule 6).
            if self.state == DirState::ReadEof && self.pending == 0 {
                if !last {
                    match dst.sock.shutdown(Shutdown::Write) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(e) => return Err(e),
                    }
                }
                self.state = DirState::WriteShut;
                out.changed = true;
                progress = true;
            }
            if self.state == DirState::Open && src.readable {
                if read >= budget {
                    out.more = true;
                } else if self.room(pool) > 0 {
                    match self.read_in(src) {
                        Ok(0) => {
                            self.state = DirState::ReadEof;
                            out.changed = true;
                            progress = true;
                        }
                        Ok(n) => {
                            self.pending += n;
                            read += n;
                            progress = true;
                        }
                        // With bytes in the pipe, EAGAIN may mean "pipe full":
                        // only an empty pipe proves the socket is drained (rule 3).
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if self.pending == 0 {
                                src.readable = false;
                            }
                        }
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
    pub fn release(&mut self, pool: &mut PipePool) {
        match std::mem::replace(&mut self.channel, Channel::Idle) {
            Channel::Pipe(p) => pool.give(p, self.pending == 0),
            Channel::Copy { .. } | Channel::Idle => {}
        }
    }

    /// Free room in the channel, acquiring a pipe or buffer if idle.
    fn room(&mut self, pool: &mut PipePool) -> usize {
        if let Channel::Idle = self.channel {
            self.channel = match self.splice.then(|| pool.take()).flatten() {
                Some(p) => Channel::Pipe(p),
                None => Channel::Copy { buf: vec![0; COPY_BUF].into_boxed_slice(), start: 0, end: 0 },
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

    fn read_in(&mut self, src: &mut Side) -> io::Result<usize> {
        match &mut self.channel {
            Channel::Idle => Ok(0),
            // Never more than the free room (rule 2).
            Channel::Pipe(p) => {
                let room = p.capacity().saturating_sub(self.pending);
                sys::splice(src.sock.as_fd(), p.write_end(), room)
            }
            Channel::Copy { buf, end, .. } => {
                let n = (&src.sock).read(&mut buf[*end..])?;
                *end += n;
                Ok(n)
            }
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
