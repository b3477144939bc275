//! Thin wrappers over `sendmsg`/`recvmsg` with `SCM_RIGHTS`, and a connect that cannot hang.
//!
//! vmm-sys-util's `ScmSocket` is close, but it reports truncated control data as an error after
//! the bytes were already consumed (a stream protocol would lose its place), and it does not ask
//! for `MSG_CMSG_CLOEXEC`, so received fds would leak into anything the VMM executes.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::MAX_FDS_PER_REQUEST;

/// Control-message buffer for up to `MAX_FDS_PER_REQUEST` fds; `u64`s for cmsghdr alignment.
/// 16 words = 128 bytes, more than `CMSG_SPACE(16 * 4)` = 80.
type CmsgBuf = [u64; 16];

fn cmsg_space(num_fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((num_fds * mem::size_of::<RawFd>()) as u32) as usize }
}

/// What one `recvmsg` brought.
pub struct Received {
    /// Bytes read into the buffer; 0 is end-of-file.
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The sender attached more fds than we have room for: the kernel closed the rest.
    pub fds_truncated: bool,
}

/// Non-blocking `recvmsg`: data into `buf`, `SCM_RIGHTS` fds (close-on-exec) into `fds`.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    const _: () = assert!(mem::size_of::<CmsgBuf>() >= 80);
    let mut cmsg_buf: CmsgBuf = [0; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(MAX_FDS_PER_REQUEST) as _;

    // SAFETY: msg points at `iov` (covering `buf`) and `cmsg_buf`, all alive and writable for
    // the call; the kernel writes at most the lengths given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, bounded by
    // msg_controllen; each SCM_RIGHTS payload is an array of fds now owned by this process, so
    // wrapping each in an OwnedFd (exactly once) is sound. read_unaligned because CMSG_DATA
    // gives no alignment guarantee for the payload type.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..payload / mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n as usize,
        fds,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// One `sendmsg` of (a prefix of) `data`, with `fds` as `SCM_RIGHTS`; returns bytes sent. No
/// SIGPIPE: a vanished peer is `EPIPE`.
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[BorrowedFd], flags: i32) -> io::Result<usize> {
    assert!(fds.len() <= MAX_FDS_PER_REQUEST);
    let mut cmsg_buf: CmsgBuf = [0; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: the control buffer holds CMSG_SPACE(fds) bytes (checked by the const assert
        // in recv_with_fds and the length assert above), so the first header and its data fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * mem::size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg points at `iov` (covering `data`, which the kernel only reads) and the
    // control buffer, both alive for the call.
    let n = unsafe { libc::sendmsg(fd, &msg, flags | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `sockaddr_un` for a path, or `None` if it does not fit.
fn sockaddr_un(path: &Path) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Keep a NUL at the end; an empty path or one with a NUL inside is not a file.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Some((addr, len as libc::socklen_t))
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    PathTooLong,
    /// The listener's backlog stayed full until the deadline (the server is not accepting).
    TimedOut,
    Os(io::Error),
}

/// Connects to a Unix stream socket without ever blocking past `deadline`: a blocking
/// `connect` waits forever when the listener's backlog is full (a wedged VMM), a non-blocking
/// one says `EAGAIN` and we retry. The returned stream is in blocking mode.
pub fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, ConnectError> {
    let (addr, len) = sockaddr_un(path).ok_or(ConnectError::PathTooLong)?;
    // SAFETY: plain syscall; the result is checked and owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(ConnectError::Os(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes, alive for the call.
        let ret = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if ret == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Some(libc::EAGAIN) => return Err(ConnectError::TimedOut),
            _ => return Err(ConnectError::Os(err)),
        }
    }
    let stream = UnixStream::from(sock);
    stream.set_nonblocking(false).map_err(ConnectError::Os)?;
    Ok(stream)
}
