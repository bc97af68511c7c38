//! A connection's byte stream: the client's socket, or a TLS session on it after
//! `NBD_OPT_STARTTLS`. The handshake and transmission code read and write through this one
//! seam, so plain and TLS connections share every line of request handling.

use crate::stream::Stream;
use crate::tls::TlsStream;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::time::Duration;

/// The client's socket, plain or through TLS.
#[derive(Debug)]
pub(crate) enum Channel {
    Plain(Stream),
    Tls(TlsStream),
}

impl Channel {
    /// Another handle on the same connection (and TLS session).
    pub(crate) fn try_clone(&self) -> io::Result<Channel> {
        Ok(match self {
            Channel::Plain(s) => Channel::Plain(s.try_clone()?),
            Channel::Tls(t) => Channel::Tls(t.try_clone()),
        })
    }

    /// The client's socket itself.
    pub(crate) fn socket(&self) -> &Stream {
        match self {
            Channel::Plain(s) => s,
            Channel::Tls(t) => t.socket(),
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        self.socket().shutdown(how);
    }

    /// Ends the connection: a TLS session is closed with `close_notify` first (best effort).
    pub(crate) fn close(&self) {
        match self {
            Channel::Plain(s) => s.shutdown(Shutdown::Both),
            Channel::Tls(t) => t.close(),
        }
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(t)
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Channel::Plain(s) => s.set_write_timeout(t),
            Channel::Tls(tls) => tls.set_write_timeout(t),
        }
    }

    /// Sends what it can of `bufs` without blocking (see [`Stream::send_vectored_nonblocking`]).
    /// Over TLS, a send the socket took only part of must be retried with the same bytes
    /// before anything else is sent (see `TlsStream::send`), which the transmission code does
    /// anyway: the rest of a batch the socket would not take goes to the writer thread.
    pub(crate) fn send_vectored_nonblocking(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.send_vectored_nonblocking(bufs),
            Channel::Tls(t) => t.send_vectored_nonblocking(bufs),
        }
    }

    /// True if a read would not block.
    pub(crate) fn readable_now(&self) -> bool {
        match self {
            Channel::Plain(s) => s.readable_now(),
            Channel::Tls(t) => t.readable_now(),
        }
    }

    /// See [`Stream::hung_up`].
    pub(crate) fn hung_up(&self) -> bool {
        self.socket().hung_up()
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.read(buf),
            Channel::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.write(buf),
            Channel::Tls(t) => t.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.write_vectored(bufs),
            Channel::Tls(t) => t.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Plain(s) => s.flush(),
            Channel::Tls(t) => t.flush(),
        }
    }
}
