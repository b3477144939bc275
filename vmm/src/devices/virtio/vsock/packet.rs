//! The virtio-vsock packet header (virtio spec 5.10.6) and moving packets between descriptor
//! chains and host memory.
//!
//! Everything here distrusts the guest: the header and payload may be split across
//! descriptors in any way, and the `len` field is only believed when the chain actually holds
//! that many bytes and it is under [`MAX_PKT_PAYLOAD`]. Payloads are copied out of guest
//! memory, which keeps lifetimes simple and makes the guest unable to change a packet while
//! we look at it.

use std::io::{Read, Write};
use std::ops::Deref;

use virtio_queue::{DescriptorChain, Writer};

use super::VsockError;
use crate::devices::virtio::GuestMemory;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// Largest payload we accept from or hand to the guest in one packet (Linux uses 64 KiB).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data / send no more data.
pub const SHUTDOWN_F_RCV: u32 = 1;
pub const SHUTDOWN_F_SEND: u32 = 2;
pub const SHUTDOWN_F_BOTH: u32 = SHUTDOWN_F_RCV | SHUTDOWN_F_SEND;

/// `struct virtio_vsock_hdr`, decoded. All fields are little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        VsockHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet going from the host to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxPacket {
    pub hdr: VsockHeader,
    pub data: Vec<u8>,
}

impl RxPacket {
    pub fn control(hdr: VsockHeader) -> Self {
        RxPacket {
            hdr,
            data: Vec::new(),
        }
    }
}

/// Reads one guest → host packet out of a TX descriptor chain.
///
/// Only the device-readable part of the chain counts (a write-only descriptor ends it), so a
/// header placed in a write-only buffer reads as "too short".
pub fn read_tx_packet<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
) -> Result<(VsockHeader, Vec<u8>), VsockError>
where
    M: Deref<Target = GuestMemory>,
{
    let mut reader = chain.reader(mem).map_err(VsockError::DescriptorChain)?;
    let have = reader.available_bytes();
    if have < HDR_SIZE {
        return Err(VsockError::HeaderTooShort { have });
    }
    let mut raw = [0u8; HDR_SIZE];
    reader
        .read_exact(&mut raw)
        .map_err(VsockError::GuestMemory)?;
    let hdr = VsockHeader::from_bytes(&raw);

    // Only RW carries a payload; a length on anything else is ignored rather than read, so a
    // stray `len` on a control packet cannot make us copy guest memory for nothing.
    if hdr.op != OP_RW || hdr.len == 0 {
        return Ok((hdr, Vec::new()));
    }
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD {
        return Err(VsockError::PayloadTooLarge {
            hdr: Box::new(hdr),
            len: hdr.len,
            max: MAX_PKT_PAYLOAD,
        });
    }
    let have = reader.available_bytes();
    if len > have {
        return Err(VsockError::PayloadTruncated {
            hdr: Box::new(hdr),
            len: hdr.len,
            have,
        });
    }
    let mut data = vec![0u8; len];
    reader
        .read_exact(&mut data)
        .map_err(VsockError::GuestMemory)?;
    Ok((hdr, data))
}

/// Writes a host → guest packet into an RX chain's writer; returns the bytes written (the
/// used length). The caller sized the payload from `writer.available_bytes()`.
pub fn write_rx_packet(writer: &mut Writer<'_>, pkt: &RxPacket) -> Result<u32, VsockError> {
    let mut hdr = pkt.hdr;
    hdr.len = pkt.data.len() as u32;
    writer
        .write_all(&hdr.to_bytes())
        .map_err(VsockError::GuestMemory)?;
    writer
        .write_all(&pkt.data)
        .map_err(VsockError::GuestMemory)?;
    Ok((HDR_SIZE + pkt.data.len()) as u32)
}
