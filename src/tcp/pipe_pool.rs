//! Pipes lent to connections only while bytes are in flight (DATAPATH rule 8).
//!
//! A pipe comes back to the pool empty (a pipe still holding data is closed,
//! never pooled), and the pool keeps at most `max_spare` of them.

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

/// Spare empty pipes and the settings to make new ones.
pub struct PipePool {
    spare: Vec<Pipe>,
    max_spare: usize,
    size: usize,
    lent: usize,
    warned_size: bool,
    warned_create: bool,
}

impl PipePool {
    /// A pool making pipes of `size` bytes and keeping up to `max_spare` idle ones.
    pub fn new(size: usize, max_spare: usize) -> Self {
        PipePool { spare: Vec::new(), max_spare, size, lent: 0, warned_size: false, warned_create: false }
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
