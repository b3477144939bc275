//! virtio-blk (virtio spec 5.2) backed by a raw image file or a host block device.
//!
//! One request queue. A request is first parsed into guest (address, length) pieces and
//! checked against the disk's capacity; only then does it touch the file. Data moves
//! between the file and guest memory through vm-memory's checked volatile IO, so there is
//! neither a bounce buffer nor a raw pointer. Whatever the guest puts in a chain, the
//! chain goes back on the used ring: with an IOERR status when there is a status byte to
//! write, with length 0 when there is not.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, error};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::activation::DeviceActivation;
use super::single_queue::{self, SingleQueueDevice, EV_ACTIVATE, EV_QUEUE};
use super::{
    read_config_bytes, ActivateError, Activation, GuestMemory, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};
use crate::devices::guest_warn::guest_warn;
use crate::devices::rate_limiter::RateLimiter;

pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// Header and status take one descriptor each, so a full-size chain has room for this many
/// data pieces.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest chain we walk. A direct chain can never be longer than the queue, but an
/// indirect table can list 65535 entries; no valid request needs more than the queue size.
const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
const HEADER_LEN: usize = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("cannot size disk image: {0}")]
    Size(io::Error),
    #[error("cannot create eventfd: {0}")]
    EventFd(io::Error),
    #[error("device-readable descriptor after a device-writable one")]
    DescriptorOrder,
    #[error("request header shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    #[error("data descriptor has the wrong direction for the request type")]
    DataDirection,
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    DataLength(u64),
    #[error("sectors {sector}+{count} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest memory: {0}")]
    GuestMemory(GuestMemoryError),
    #[error("disk I/O: {0}")]
    Io(io::Error),
}

/// A run of guest memory a request reads or writes.
#[derive(Clone, Copy, Debug)]
struct Piece {
    addr: GuestAddress,
    len: u32,
}

impl From<&Descriptor> for Piece {
    fn from(d: &Descriptor) -> Self {
        Piece {
            addr: d.addr(),
            len: d.len(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RequestType {
    In,
    Out,
    Flush,
    GetId,
}

#[derive(Debug)]
struct Request {
    kind: RequestType,
    sector: u64,
    /// Device-readable bytes after the header: the data of an OUT request.
    readable: Vec<Piece>,
    /// Device-writable bytes before the status byte: the buffer of IN and GET_ID.
    writable: Vec<Piece>,
}

fn total_len(pieces: &[Piece]) -> u64 {
    // Cannot overflow: at most MAX_CHAIN_DESCS pieces of at most u32::MAX bytes each.
    pieces.iter().map(|p| u64::from(p.len)).sum()
}

/// Copies the first `buf.len()` bytes of `pieces` into `buf` and drops them from `pieces`.
fn take_bytes(
    mem: &GuestMemory,
    pieces: &mut VecDeque<Piece>,
    buf: &mut [u8],
) -> Result<(), BlockError> {
    let mut done = 0;
    while done < buf.len() {
        let piece = pieces.front_mut().ok_or(BlockError::ShortHeader)?;
        let n = (buf.len() - done).min(piece.len as usize);
        mem.read_slice(&mut buf[done..done + n], piece.addr)
            .map_err(BlockError::GuestMemory)?;
        done += n;
        // n <= piece.len, and the read above proved addr..addr+n is in guest memory.
        piece.len -= n as u32;
        piece.addr = GuestAddress(piece.addr.0.wrapping_add(n as u64));
        if piece.len == 0 {
            pieces.pop_front();
        }
    }
    Ok(())
}

/// The disk image and what requests need to know about it. Kept apart from the queue
/// state so a request can borrow both.
struct Disk {
    file: File,
    /// In sectors; the image's tail past the last full sector is not visible.
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    /// The driver acked FLUSH, so it will ask for flushes: writes may stay in the host
    /// page cache until then. Without it the device must be write-through.
    writeback: bool,
}

impl Disk {
    /// Handles one chain and returns the number of bytes written into it.
    fn handle_chain(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let descs: Vec<Descriptor> = chain.take(MAX_CHAIN_DESCS + 1).collect();
        let Some(status_addr) = status_addr(&descs) else {
            guest_warn!("virtio-blk: request without a writable status byte, dropped");
            return 0;
        };
        let (status, written) = match self.parse(mem, &descs).and_then(|r| self.execute(mem, &r)) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(BlockError::Unsupported(t)) => {
                debug!("virtio-blk: unsupported request type {t}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
            Err(e) => {
                guest_warn!("virtio-blk: request failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        match mem.write_obj(status as u8, status_addr) {
            Ok(()) => written.saturating_add(1),
            Err(e) => {
                guest_warn!("virtio-blk: cannot write request status: {e}");
                0
            }
        }
    }

    fn parse(&self, mem: &GuestMemory, descs: &[Descriptor]) -> Result<Request, BlockError> {
        // status_addr() has checked that the last descriptor is writable and non-empty.
        let first_writable = descs
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descs.len());
        if descs[first_writable..].iter().any(|d| !d.is_write_only()) {
            return Err(BlockError::DescriptorOrder);
        }
        let mut readable: VecDeque<Piece> = descs[..first_writable]
            .iter()
            .map(Piece::from)
            .filter(|p| p.len > 0)
            .collect();
        let mut writable: Vec<Piece> = descs[first_writable..].iter().map(Piece::from).collect();
        if let Some(last) = writable.last_mut() {
            last.len -= 1; // the status byte
        }
        writable.retain(|p| p.len > 0);

        let mut header = [0u8; HEADER_LEN];
        take_bytes(mem, &mut readable, &mut header)?;
        let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let readable: Vec<Piece> = readable.into();

        let kind = match req_type {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            t => return Err(BlockError::Unsupported(t)),
        };
        let data = match kind {
            RequestType::In if !readable.is_empty() => return Err(BlockError::DataDirection),
            RequestType::Out if !writable.is_empty() => return Err(BlockError::DataDirection),
            RequestType::Out if self.read_only => return Err(BlockError::ReadOnly),
            RequestType::In => total_len(&writable),
            RequestType::Out => total_len(&readable),
            RequestType::Flush | RequestType::GetId => 0,
        };
        if data % SECTOR_SIZE != 0 {
            return Err(BlockError::DataLength(data));
        }
        let count = data / SECTOR_SIZE;
        if sector
            .checked_add(count)
            .is_none_or(|end| end > self.capacity)
        {
            return Err(BlockError::OutOfRange {
                sector,
                count,
                capacity: self.capacity,
            });
        }
        Ok(Request {
            kind,
            sector,
            readable,
            writable,
        })
    }

    /// Carries out a parsed request; returns the bytes written into the guest's buffers.
    fn execute(&mut self, mem: &GuestMemory, req: &Request) -> Result<u32, BlockError> {
        // parse() bounded sector + count by the capacity, itself file length / 512.
        let offset = req.sector * SECTOR_SIZE;
        match req.kind {
            RequestType::In => {
                self.file
                    .seek(SeekFrom::Start(offset))
                    .map_err(BlockError::Io)?;
                for p in &req.writable {
                    mem.read_exact_volatile_from(p.addr, &mut self.file, p.len as usize)
                        .map_err(BlockError::GuestMemory)?;
                }
                // A chain's buffers add up to less than 4 GiB (virtio-queue stops there).
                Ok(u32::try_from(total_len(&req.writable)).unwrap_or(u32::MAX))
            }
            RequestType::Out => {
                self.file
                    .seek(SeekFrom::Start(offset))
                    .map_err(BlockError::Io)?;
                for p in &req.readable {
                    mem.write_all_volatile_to(p.addr, &mut self.file, p.len as usize)
                        .map_err(BlockError::GuestMemory)?;
                }
                if !self.writeback {
                    self.file.sync_data().map_err(BlockError::Io)?;
                }
                Ok(0)
            }
            RequestType::Flush => {
                self.file.sync_data().map_err(BlockError::Io)?;
                Ok(0)
            }
            RequestType::GetId => {
                let mut id: &[u8] = &self.id;
                for p in &req.writable {
                    if id.is_empty() {
                        break;
                    }
                    let n = id.len().min(p.len as usize);
                    mem.write_slice(&id[..n], p.addr)
                        .map_err(BlockError::GuestMemory)?;
                    id = &id[n..];
                }
                Ok((ID_LEN - id.len()) as u32)
            }
        }
    }
}

/// Where the status byte goes: the last byte of the chain, which must be device-writable.
fn status_addr(descs: &[Descriptor]) -> Option<GuestAddress> {
    if descs.len() > MAX_CHAIN_DESCS {
        return None;
    }
    let last = descs.last()?;
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    last.addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
}

/// A virtio-blk device. The VM builder creates it with [`Block::new`], attaches it to an
/// MMIO transport and adds it to the event manager as a subscriber.
pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; 16],
    activation: DeviceActivation,
    limiter: Option<RateLimiter>,
}

impl Block {
    /// Opens the image at `path` (read-write unless `read_only`). The capacity is fixed at
    /// open time; the GET_ID serial is derived from the file's device and inode numbers.
    pub fn new(path: impl AsRef<Path>, read_only: bool) -> Result<Block, BlockError> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.display().to_string(),
                source,
            })?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        let meta = file.metadata().map_err(BlockError::Size)?;
        let mut id = [0u8; ID_LEN];
        let serial = format!("{:x}{:x}{:x}", meta.dev(), meta.rdev(), meta.ino());
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);

        let capacity = size / SECTOR_SIZE;
        let mut config = [0u8; 16];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // config[8..12] is size_max, not offered.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        let mut avail_features =
            VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX;
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Block {
            disk: Disk {
                file,
                capacity,
                read_only,
                id,
                writeback: false,
            },
            avail_features,
            acked_features: 0,
            config,
            activation: DeviceActivation::new("virtio-blk", EV_ACTIVATE, &[EV_QUEUE])
                .map_err(BlockError::EventFd)?,
            limiter: None,
        })
    }

    /// Replaces the GET_ID serial (truncated to 20 bytes, zero-padded).
    pub fn with_serial(mut self, serial: &str) -> Self {
        let n = serial.len().min(ID_LEN);
        self.disk.id = [0; ID_LEN];
        self.disk.id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        self
    }

    /// Limits the guest's requests: each costs an operation and its chain's bytes.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    fn process_queue(&mut self) {
        let Some(active) = self.activation.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        let queue = &mut active.queues[0];
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            if let Some(limiter) = &mut self.limiter {
                let bytes = chain.clone().map(|d| u64::from(d.len())).sum();
                if !limiter.consume(bytes) {
                    // Served when the limiter's timer fires.
                    queue.go_to_previous_position();
                    break;
                }
            }
            let head = chain.head_index();
            let len = self.disk.handle_chain(&active.mem, chain);
            if let Err(e) = queue.add_used(&active.mem, head, len) {
                guest_warn!("virtio-blk: cannot return descriptor {head}: {e}");
            }
            used_any = true;
        }
        if used_any {
            if let Err(e) = active.irq.signal_used() {
                error!("virtio-blk: cannot raise interrupt: {e}");
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
        self.disk.writeback = self.acked_features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-blk: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.activation.activate(activation)
    }

    fn reset(&mut self) -> bool {
        self.activation.reset();
        self.acked_features = 0;
        self.disk.writeback = false;
        true
    }

    fn is_activated(&self) -> bool {
        self.activation.is_active()
    }
}

impl SingleQueueDevice for Block {
    const NAME: &'static str = "virtio-blk";

    fn activation(&mut self) -> &mut DeviceActivation {
        &mut self.activation
    }

    fn limiter(&mut self) -> Option<&mut RateLimiter> {
        self.limiter.as_mut()
    }

    fn process_queue(&mut self) {
        Block::process_queue(self)
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        single_queue::init(self, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        single_queue::process(self, events, ops);
    }
}

#[cfg(test)]
mod tests;
