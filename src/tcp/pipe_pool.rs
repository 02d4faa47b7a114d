//! Pipes (and copy buffers) lent to connections only while bytes are in flight.
//!
//! A pipe comes back to the pool empty (a pipe still holding data is closed,
//! never pooled), and the pool keeps at most `max_spare` of them. Copy
//! buffers, used when no pipe can be had or splice is off, are pooled the
//! same way, so a copying transfer does not allocate per burst.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// A kernel pipe: the buffer between a source and a destination socket.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// The end bytes are spliced out of.
    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The end bytes are spliced into.
    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// Its capacity in bytes (page slots times the page size).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Size of a copy buffer.
pub(crate) const COPY_BUF: usize = 16 * 1024;

/// Spare empty pipes and the settings to make new ones.
pub struct PipePool {
    spare: Vec<Pipe>,
    spare_bufs: Vec<Box<[u8]>>,
    max_spare: usize,
    size: usize,
    lent: usize,
    warned_size: bool,
    warned_create: bool,
}

impl PipePool {
    /// A pool making pipes of `size` bytes and keeping up to `max_spare` idle ones.
    pub fn new(size: usize, max_spare: usize) -> Self {
        PipePool {
            spare: Vec::new(),
            spare_bufs: Vec::new(),
            max_spare,
            size,
            lent: 0,
            warned_size: false,
            warned_create: false,
        }
    }

    /// Lends an empty pipe, making one if none is spare. `None` when the
    /// system refuses a new pipe (fd or memory limits): the caller copies instead.
    pub fn take(&mut self) -> Option<Pipe> {
        let pipe = match self.spare.pop() {
            Some(p) => p,
            None => match self.create() {
                Ok(p) => p,
                Err(e) => {
                    if !self.warned_create {
                        log::warn!("cannot create a pipe ({e}); copying through user memory until pipes are available");
                        self.warned_create = true;
                    }
                    return None;
                }
            },
        };
        self.lent += 1;
        Some(pipe)
    }

    /// Takes back a pipe. `empty` says whether it holds no bytes; a pipe with
    /// bytes left is closed, so no stale data reaches the next borrower.
    pub fn give(&mut self, pipe: Pipe, empty: bool) {
        self.lent -= 1;
        if empty && self.spare.len() < self.max_spare {
            self.spare.push(pipe);
        }
    }

    /// Lends a copy buffer, allocating one only if none is spare.
    pub(crate) fn take_buf(&mut self) -> Box<[u8]> {
        self.spare_bufs.pop().unwrap_or_else(|| vec![0; COPY_BUF].into_boxed_slice())
    }

    /// Takes back a copy buffer (its contents are overwritten before use).
    pub(crate) fn give_buf(&mut self, buf: Box<[u8]>) {
        if self.spare_bufs.len() < self.max_spare {
            self.spare_bufs.push(buf);
        }
    }

    /// How many pipes are lent out now.
    pub fn lent(&self) -> usize {
        self.lent
    }

    /// How many empty pipes wait in the pool.
    pub fn spare(&self) -> usize {
        self.spare.len()
    }

    fn create(&mut self) -> io::Result<Pipe> {
        let (read, write) = sys::pipe()?;
        let capacity = match sys::set_pipe_size(write.as_fd(), self.size) {
            Ok(n) => n,
            Err(e) => {
                if !self.warned_size {
                    // Past /proc/sys/fs/pipe-user-pages-soft an unprivileged
                    // user's pipes shrink: run slower, but run.
                    log::warn!("cannot size pipes to {} bytes ({e}); using smaller pipes", self.size);
                    self.warned_size = true;
                }
                sys::pipe_size(write.as_fd())?
            }
        };
        if self.warned_create {
            log::info!("pipes can be created again; splicing resumes");
            self.warned_create = false;
        }
        Ok(Pipe { read, write, capacity })
    }
}
