//! virtio-net both ways: TX chains the guest wrote (any vnet header, GSO and NEEDS_CSUM
//! requests for offloads nobody negotiated included, any chain shape, loops, out-of-range
//! addresses and lengths), and RX frames from the "tap" (here one end of a datagram
//! socketpair: a datagram is a frame with its vnet header, as a tap reads and writes them)
//! into whatever buffers the guest posted.
//!
//! Input: queue-size byte, then a frame-count byte, then that many frames (u16 LE length and
//! the bytes) the host end sends before the device runs, then guest memory from address 0.
//! Queue 0 (RX) has its rings at 0, queue 1 (TX) at 0x400 (see the crate's `queue`).
//!
//! Besides not crashing, what reaches the host end must be what a tap may get: a frame
//! longer than its header, at most MAX_FRAME_LEN, and a header of zeros (no offload request
//! of the guest survives).
#![no_main]
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use husk_vmm_fuzz::{guest_memory, queue_size_and_rest, run_device};
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::{Net, MAX_FRAME_LEN, VNET_HDR_LEN};

/// At most this many frames wait in the socketpair (net.unix.max_dgram_qlen is 10 by
/// default: more would only fail to send).
const MAX_RX_FRAMES: u8 = 8;

/// Splits the frames off the front of `data`; returns them and the rest.
fn frames(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let mut out = Vec::new();
    for _ in 0..n % (MAX_RX_FRAMES + 1) {
        let Some((len, r)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_le_bytes(*len)).min(r.len());
        out.push(&r[..len]);
        rest = &r[len..];
    }
    (out, rest)
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array, which is valid for the call.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fuzz_target!(|data: &[u8]| {
    let Some((size, _, rest)) = queue_size_and_rest(data) else {
        return;
    };
    let (rx_frames, mem) = frames(rest);
    let (dev_end, host_end) = socketpair();
    for f in &rx_frames {
        // SAFETY: f is valid for its length; a full socket only fails the send.
        unsafe { libc::send(host_end.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    }
    let net = Net::new_with_datagram_fd_for_fuzzing(dev_end).unwrap();
    run_device(net, &guest_memory(mem), 2, size);
    let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
    loop {
        // SAFETY: buf is valid for its length; MSG_TRUNC makes the return the datagram's
        // real length, so an oversized frame cannot hide behind the buffer's size.
        let n = unsafe {
            libc::recv(
                host_end.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            break;
        }
        let n = n as usize;
        assert!(
            n > VNET_HDR_LEN && n <= MAX_FRAME_LEN,
            "a {n}-byte frame reached the tap"
        );
        assert_eq!(
            buf[..VNET_HDR_LEN],
            [0u8; VNET_HDR_LEN],
            "a guest's vnet header reached the tap"
        );
    }
});
