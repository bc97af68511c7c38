//! The server's sockets: listeners and client connections of either kind (TCP or Unix).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// Who is at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    /// What identifies the client across its connections: an IP address, or a process and
    /// user (logs count connections by it).
    pub(crate) who: String,
    /// This connection's own address (with the port for TCP).
    pub(crate) detail: String,
}

impl Peer {
    fn unknown(kind: &str) -> Peer {
        Peer {
            who: format!("unknown {kind} peer"),
            detail: format!("unknown {kind} peer"),
        }
    }
}

/// A listening socket.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Waits up to `timeout` for a connection to accept; false when none came (or a signal
    /// interrupted the wait).
    pub(crate) fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let timeout = Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let ready = match self {
            Listener::Tcp(l) => poll(&mut [PollFd::new(l, PollFlags::IN)], Some(&timeout)),
            Listener::Unix(l, _) => poll(&mut [PollFd::new(l, PollFlags::IN)], Some(&timeout)),
        };
        match ready {
            Ok(n) => Ok(n > 0),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// A connected client socket of either kind.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    pub(crate) fn shutdown(&self, how: Shutdown) {
        // Errors only mean the socket is already closed.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
    /// `sendmsg` with `MSG_DONTWAIT`: never blocks, even though the socket is blocking
    /// (the reader shares the file description, so `O_NONBLOCK` is not an option).
    pub(crate) fn send_vectored_nonblocking(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        let mut control = SendAncillaryBuffer::default();
        let sent = match self {
            Stream::Tcp(s) => sendmsg(s, bufs, &mut control, flags),
            Stream::Unix(s) => sendmsg(s, bufs, &mut control, flags),
        };
        sent.map_err(io::Error::from)
    }

    /// A blocking read through a shared reference (bounded by the read timeout).
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    /// Waits up to `timeout` (`Duration::MAX`: for ever) for room to send; false when the
    /// time ran out. True also when the socket failed or was shut down: the next send says so.
    pub(crate) fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let timeout = (timeout != Duration::MAX).then(|| Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        });
        let mut fd = [match self {
            Stream::Tcp(s) => PollFd::new(s, PollFlags::OUT),
            Stream::Unix(s) => PollFd::new(s, PollFlags::OUT),
        }];
        match poll(&mut fd, timeout.as_ref()) {
            Ok(n) => Ok(n > 0),
            // A signal: the caller sends again, which is harmless.
            Err(rustix::io::Errno::INTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// True if a read would not block: data (or end of file, or an error) is waiting.
    pub(crate) fn readable_now(&self) -> bool {
        use rustix::net::{recv, RecvFlags};
        let mut byte = [0u8; 1];
        let flags = RecvFlags::PEEK | RecvFlags::DONTWAIT;
        let r = match self {
            Stream::Tcp(s) => recv(s, &mut byte[..], flags),
            Stream::Unix(s) => recv(s, &mut byte[..], flags),
        };
        !matches!(r, Err(rustix::io::Errno::AGAIN))
    }

    /// True once nothing sent on this connection can reach the client any more: the peer
    /// closed its end (a Unix socket whose peer is gone) or reset the connection (TCP: a
    /// client that closes with replies unread in its receive queue). Never blocks.
    ///
    /// A peer that only shut down its sending side is not hung up: a client may do that after
    /// `NBD_CMD_DISC` and still read the replies to its earlier requests. (So a TCP client
    /// that closes with nothing unread, which sends just a FIN, is only noticed by the first
    /// reply written to it.)
    pub(crate) fn hung_up(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // POLLHUP and POLLERR are reported whatever events are asked for.
        let mut fd = [match self {
            Stream::Tcp(s) => PollFd::new(s, PollFlags::empty()),
            Stream::Unix(s) => PollFd::new(s, PollFlags::empty()),
        }];
        match poll(&mut fd, Some(&zero)) {
            Ok(_) => fd[0].revents().intersects(PollFlags::HUP | PollFlags::ERR),
            Err(_) => false,
        }
    }

    /// Who is at the other end, for logs: the address of a TCP peer; the process and user of
    /// a Unix socket peer (the kernel's record of who connected).
    pub(crate) fn peer(&self) -> Peer {
        match self {
            Stream::Tcp(s) => match s.peer_addr() {
                Ok(a) => Peer {
                    who: a.ip().to_string(),
                    detail: a.to_string(),
                },
                Err(_) => Peer::unknown("tcp"),
            },
            Stream::Unix(s) => match rustix::net::sockopt::socket_peercred(s) {
                Ok(cred) => {
                    let who = format!("pid {} (uid {})", cred.pid.as_raw_nonzero(), cred.uid.as_raw());
                    Peer {
                        detail: who.clone(),
                        who,
                    }
                }
                Err(_) => Peer::unknown("unix"),
            },
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hung_up_means_the_peer_closed_not_that_it_stopped_sending() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let ours = Stream::Unix(ours);
        assert!(!ours.hung_up());
        // A client may half-close after NBD_CMD_DISC and still read its replies.
        theirs.shutdown(Shutdown::Write).unwrap();
        assert!(!ours.hung_up(), "a half-closed peer still reads");
        drop(theirs);
        assert!(ours.hung_up());

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut ours = Stream::Tcp(listener.accept().unwrap().0);
        assert!(!ours.hung_up());
        client.shutdown(Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!ours.hung_up(), "a half-closed peer still reads");
        // Closing with data unread resets the connection.
        ours.write_all(b"unread reply").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(client);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !ours.hung_up() {
            assert!(std::time::Instant::now() < deadline, "a reset was not seen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
