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
use vmm_sys_util::epoll::EventSet;

use super::activation::DeviceActivation;
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

const EV_ACTIVATE: u32 = 0;
const EV_QUEUE: u32 = 1;
const EV_RATE_LIMITER: u32 = 2;

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

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        if let Some(l) = &self.limiter {
            if let Err(e) = ops.add(Events::with_data(l, EV_RATE_LIMITER, EventSet::IN)) {
                error!("virtio-blk: cannot register the rate limiter: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_ACTIVATE => {
                if self.activation.on_event(ops) {
                    // Requests the driver queued before the loop registered the queue.
                    self.process_queue();
                }
            }
            EV_QUEUE => {
                self.activation.clear_queue_event(EV_QUEUE);
                self.process_queue();
            }
            EV_RATE_LIMITER => {
                if let Some(l) = &mut self.limiter {
                    l.on_timer();
                }
                self.process_queue();
            }
            other => guest_warn!("virtio-blk: unexpected event {other}"),
        }
    }
}

/// Driver-side queue handling for device unit tests: lays a split queue out in guest memory
/// (with virtio-queue's mock), then adds chains and reads used entries across many
/// requests, which `MockSplitQueue` alone cannot do without borrowing the memory for good.
#[cfg(test)]
pub(crate) mod test_queue {
    use super::GuestMemory;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Clone, Copy, Debug)]
    pub(crate) struct TestDesc {
        pub addr: u64,
        pub len: u32,
        pub write: bool,
    }

    /// A device-readable buffer.
    pub(crate) fn r(addr: u64, len: u32) -> TestDesc {
        TestDesc {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub(crate) fn w(addr: u64, len: u32) -> TestDesc {
        TestDesc {
            addr,
            len,
            write: true,
        }
    }

    pub(crate) struct TestQueue {
        size: u16,
        desc_table: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
        next_desc: u16,
        queue: Option<Queue>,
    }

    impl TestQueue {
        pub(crate) fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
            let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
            TestQueue {
                size,
                desc_table: mock.desc_table_addr(),
                avail: mock.avail_addr(),
                used: mock.used_addr(),
                next_desc: 0,
                queue: Some(mock.create_queue().unwrap()),
            }
        }

        /// The device side of the queue, handed over once at activation.
        pub(crate) fn take_queue(&mut self) -> Queue {
            self.queue.take().expect("queue already taken")
        }

        /// Adds one chain and makes it available; returns its head index.
        pub(crate) fn add(&mut self, mem: &GuestMemory, descs: &[TestDesc]) -> u16 {
            let n = descs.len() as u16;
            assert!(n > 0 && n <= self.size);
            if self.next_desc + n > self.size {
                self.next_desc = 0;
            }
            let head = self.next_desc;
            for (i, d) in descs.iter().enumerate() {
                let idx = head + i as u16;
                let mut flags = if d.write {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let desc = Descriptor::new(d.addr, d.len, flags, idx + 1);
                let at = GuestAddress(self.desc_table.0 + 16 * u64::from(idx));
                mem.write_obj(desc, at).unwrap();
            }
            self.next_desc += n;
            let avail_idx: u16 = mem.read_obj(GuestAddress(self.avail.0 + 2)).unwrap();
            let slot = self.avail.0 + 4 + 2 * u64::from(avail_idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            mem.write_obj(avail_idx.wrapping_add(1), GuestAddress(self.avail.0 + 2))
                .unwrap();
            head
        }

        pub(crate) fn used_idx(&self, mem: &GuestMemory) -> u16 {
            mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap()
        }

        /// The `i`th used entry ever written: (head index, length).
        pub(crate) fn used(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
            let slot = self.used.0 + 4 + 8 * u64::from(i % self.size);
            let id: u32 = mem.read_obj(GuestAddress(slot)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(slot + 4)).unwrap();
            (id, len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_queue::{r, w, TestDesc, TestQueue};
    use super::*;
    use crate::devices::virtio::test_utils::guest_memory;
    use crate::devices::virtio::IrqTrigger;
    use event_manager::{EventManager, SubscriberOps};
    use proptest::prelude::*;
    use std::io::{Read, Write};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::tempfile::TempFile;

    const MEM_SIZE: usize = 0x10_0000;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x8_0000;
    const DISK_SECTORS: u64 = 64;

    struct Harness {
        mem: GuestMemory,
        queue: TestQueue,
        blk: Block,
        file: TempFile,
        irq: IrqTrigger,
    }

    impl Harness {
        fn new(read_only: bool) -> Self {
            let file = TempFile::new().unwrap();
            file.as_file().set_len(DISK_SECTORS * SECTOR_SIZE).unwrap();
            let blk = Block::new(file.as_path(), read_only).unwrap();
            Self::with_block(blk, file)
        }

        fn with_block(mut blk: Block, file: TempFile) -> Self {
            let mem = guest_memory(MEM_SIZE);
            let mut queue = TestQueue::new(&mem, 0, 16);
            blk.set_acked_features(blk.avail_features());
            let irq = IrqTrigger::new().unwrap();
            blk.activate(Activation {
                mem: mem.clone(),
                queues: vec![queue.take_queue()],
                queue_evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
                irq: irq.clone(),
            })
            .unwrap();
            Harness {
                mem,
                queue,
                blk,
                file,
                irq,
            }
        }

        fn header(&self, req_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        }

        /// Runs one chain through the device; returns the used length.
        fn run(&mut self, descs: &[TestDesc]) -> u32 {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let before = self.queue.used_idx(&self.mem);
            let head = self.queue.add(&self.mem, descs);
            self.blk.process_queue();
            assert_eq!(
                self.queue.used_idx(&self.mem),
                before.wrapping_add(1),
                "chain not returned"
            );
            let (id, len) = self.queue.used(&self.mem, before);
            assert_eq!(id, u32::from(head));
            len
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn disk_bytes(&self) -> Vec<u8> {
            let mut v = Vec::new();
            let mut f = File::open(self.file.as_path()).unwrap();
            f.read_to_end(&mut v).unwrap();
            v
        }
    }

    #[test]
    fn write_then_read_back() {
        let mut h = Harness::new(false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        h.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        h.header(VIRTIO_BLK_T_OUT, 3);
        // Data split over two descriptors of unequal size.
        let len = h.run(&[r(HDR, 16), r(DATA, 300), r(DATA + 300, 724), w(STATUS, 1)]);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(len, 1);
        let disk = h.disk_bytes();
        assert_eq!(&disk[3 * 512..5 * 512], &pattern[..]);
        assert!(disk[..3 * 512].iter().all(|&b| b == 0));
        assert!(disk[5 * 512..].iter().all(|&b| b == 0));

        let back = DATA + 0x1_0000;
        h.header(VIRTIO_BLK_T_IN, 3);
        let len = h.run(&[r(HDR, 16), w(back, 512), w(back + 512, 512), w(STATUS, 1)]);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(len, 1024 + 1);
        let mut got = vec![0u8; 1024];
        h.mem.read_slice(&mut got, GuestAddress(back)).unwrap();
        assert_eq!(got, pattern);
        assert_eq!(h.irq.evt.read().unwrap(), 2);
    }

    #[test]
    fn reads_see_the_backing_file() {
        let mut h = Harness::new(false);
        let mut f = OpenOptions::new()
            .write(true)
            .open(h.file.as_path())
            .unwrap();
        f.seek(SeekFrom::Start(63 * 512)).unwrap();
        f.write_all(&[0xab; 512]).unwrap();
        h.header(VIRTIO_BLK_T_IN, 63);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
        let mut got = [0u8; 512];
        h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0xab; 512]);
    }

    #[test]
    fn flush_and_write_through() {
        let mut h = Harness::new(false);
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
        assert!(h.blk.disk.writeback);
        // A driver that did not ack FLUSH gets write-through, and writes still work.
        h.blk.set_acked_features(VIRTIO_F_VERSION_1);
        assert!(!h.blk.disk.writeback);
        h.mem.write_slice(&[5u8; 512], GuestAddress(DATA)).unwrap();
        h.header(VIRTIO_BLK_T_OUT, 0);
        h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(&h.disk_bytes()[..512], &[5u8; 512][..]);
    }

    #[test]
    fn get_id_returns_serial() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        let blk = Block::new(file.as_path(), false)
            .unwrap()
            .with_serial("husk-disk-0");
        let mut h = Harness::with_block(blk, file);
        h.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
        h.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]), 21);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 20];
        h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..11], b"husk-disk-0");
        assert_eq!(id[11..], [0u8; 9]);
        // A shorter buffer gets a truncated id.
        h.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 4), w(STATUS, 1)]), 5);
        h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..5], b"husk\xee");
    }

    /// The API's longest id fills GET_ID's 20 bytes: no NUL, and nothing of an earlier,
    /// longer serial shows through.
    #[test]
    fn get_id_of_twenty_bytes_fills_the_buffer() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        let blk = Block::new(file.as_path(), false)
            .unwrap()
            .with_serial("an-earlier-serial-that-is-long")
            .with_serial("read-only-disk-20byt");
        let mut h = Harness::with_block(blk, file);
        h.mem.write_slice(&[0xee; 24], GuestAddress(DATA)).unwrap();
        h.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]), 21);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 24];
        h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..20], b"read-only-disk-20byt");
        assert_eq!(id[20..], [0xee; 4], "nothing written past the buffer");
    }

    #[test]
    fn default_serial_is_derived_from_the_file() {
        let h = Harness::new(false);
        assert!(h.blk.disk.id.iter().any(|&b| b != 0));
        assert!(h
            .blk
            .disk
            .id
            .iter()
            .all(|&b| b == 0 || b.is_ascii_hexdigit()));
    }

    #[test]
    fn read_only_rejects_writes() {
        let mut h = Harness::new(true);
        assert_ne!(h.blk.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        h.mem.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
        h.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
        assert!(h.disk_bytes().iter().all(|&b| b == 0));
        // Reads and flushes still work.
        h.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        h.run(&[r(HDR, 16), w(STATUS, 1)]);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn out_of_range_and_bad_lengths_get_ioerr() {
        let mut h = Harness::new(false);
        for (sector, len) in [
            (DISK_SECTORS, 512),
            (DISK_SECTORS - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512 + 1, 512),
            (0, 511),
            (0, 513),
        ] {
            h.header(VIRTIO_BLK_T_IN, sector);
            assert_eq!(h.run(&[r(HDR, 16), w(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8, "IN sector {sector}");
            h.header(VIRTIO_BLK_T_OUT, sector);
            h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]);
            assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8, "OUT sector {sector}");
        }
        assert!(h.disk_bytes().iter().all(|&b| b == 0));
        // The last sector itself is fine.
        h.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
        h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let mut h = Harness::new(false);
        h.header(0x1234, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn malformed_chains_do_not_panic() {
        let mut h = Harness::new(false);
        h.header(VIRTIO_BLK_T_IN, 0);
        // No writable status byte: returned with length 0, status untouched.
        assert_eq!(h.run(&[r(HDR, 16), r(STATUS, 1)]), 0);
        assert_eq!(h.status(), 0xff);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 0)]), 0);
        // IN whose data descriptor is device-readable.
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
        // OUT whose data descriptor is device-writable.
        h.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
        // Readable after writable.
        assert_eq!(h.run(&[w(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
        // Header too short, and header outside guest memory.
        assert_eq!(h.run(&[r(HDR, 8), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(h.run(&[r(1 << 40, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
        // Data running off the end of guest memory.
        h.header(VIRTIO_BLK_T_IN, 0);
        let edge = MEM_SIZE as u64 - 256;
        assert_eq!(h.run(&[r(HDR, 16), w(edge, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
        // Status outside guest memory, or wrapping the address space.
        assert_eq!(h.run(&[r(HDR, 16), w(1 << 40, 1)]), 0);
        assert_eq!(h.run(&[r(HDR, 16), w(u64::MAX, 2)]), 0);
        // Status sharing the last descriptor with data: any layout is accepted.
        h.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 513)]), 513);
        let status: u8 = h.mem.read_obj(GuestAddress(DATA + 512)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn header_split_over_descriptors() {
        let mut h = Harness::new(false);
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.run(&[r(HDR, 5), r(HDR + 5, 11), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn activation_goes_through_the_event_loop() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let mut queue = TestQueue::new(&mem, 0, 16);
        let mut em = EventManager::<Block>::new().unwrap();
        let id = em.add_subscriber(Block::new(file.as_path(), false).unwrap());
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let irq = IrqTrigger::new().unwrap();
        let blk = em.subscriber_mut(id).unwrap();
        assert!(!blk.is_activated());
        let err = blk
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![],
                queue_evts: vec![],
                irq: irq.clone(),
            })
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { expected: 1, .. }));
        blk.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue.take_queue()],
            queue_evts: vec![evt],
            irq: irq.clone(),
        })
        .unwrap();
        assert!(blk.is_activated());
        assert!(em.run_with_timeout(1000).unwrap() >= 1);

        mem.write_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes(), GuestAddress(HDR))
            .unwrap();
        queue.add(&mem, &[r(HDR, 16), w(STATUS, 1)]);
        kick.write(1).unwrap();
        assert!(em.run_with_timeout(1000).unwrap() >= 1);
        assert_eq!(queue.used_idx(&mem), 1);
        assert_eq!(irq.evt.read().unwrap(), 1);

        // Reset: the old queue is dead, and a second activation serves the new one.
        let blk = em.subscriber_mut(id).unwrap();
        assert!(blk.reset());
        assert!(!blk.is_activated());
        em.run_with_timeout(100).unwrap();
        queue.add(&mem, &[r(HDR, 16), w(STATUS, 1)]);
        kick.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(
            queue.used_idx(&mem),
            1,
            "a reset device served its old queue"
        );
        let mut second = TestQueue::new(&mem, 0x4000, 16);
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let blk = em.subscriber_mut(id).unwrap();
        blk.activate(Activation {
            mem: mem.clone(),
            queues: vec![second.take_queue()],
            queue_evts: vec![evt],
            irq: irq.clone(),
        })
        .unwrap();
        em.run_with_timeout(100).unwrap();
        second.add(&mem, &[r(HDR, 16), w(STATUS, 1)]);
        kick.write(1).unwrap();
        assert!(em.run_with_timeout(1000).unwrap() >= 1);
        assert_eq!(second.used_idx(&mem), 1);
    }

    /// One request per 200 ms: of three queued, one is served at once and the others as the
    /// limiter's timer lets them, never before their tokens exist.
    #[test]
    fn a_rate_limited_disk_serves_requests_as_tokens_come() {
        use husk_vmm_api::{RateLimiterConfig, TokenBucketConfig};
        use std::time::{Duration, Instant};
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        let limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 200,
            }),
        })
        .unwrap();
        let blk = Block::new(file.as_path(), false)
            .unwrap()
            .with_rate_limiter(limiter);
        let mem = guest_memory(MEM_SIZE);
        let mut queue = TestQueue::new(&mem, 0, 16);
        let mut em = EventManager::<Block>::new().unwrap();
        let id = em.add_subscriber(blk);
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        em.subscriber_mut(id)
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![queue.take_queue()],
                queue_evts: vec![evt],
                irq: IrqTrigger::new().unwrap(),
            })
            .unwrap();
        em.run_with_timeout(100).unwrap();
        mem.write_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes(), GuestAddress(HDR))
            .unwrap();
        for i in 0..3 {
            queue.add(&mem, &[r(HDR, 16), w(STATUS + i * 16, 1)]);
        }
        let t = Instant::now();
        kick.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(queue.used_idx(&mem), 1, "the bucket held one request");
        while queue.used_idx(&mem) < 3 && t.elapsed() < Duration::from_secs(5) {
            em.run_with_timeout(100).unwrap();
        }
        assert_eq!(
            queue.used_idx(&mem),
            3,
            "throttled requests were never served"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(390),
            "two more requests in {:?}: faster than their tokens",
            t.elapsed()
        );
    }

    #[test]
    fn config_space_has_capacity_and_seg_max() {
        let h = Harness::new(false);
        let mut cap = [0u8; 8];
        h.blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
        let mut seg = [0u8; 4];
        h.blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        assert_eq!(h.blk.device_type(), TYPE_BLOCK);
        assert_eq!(h.blk.queue_max_sizes(), &[QUEUE_SIZE]);
    }

    fn any_desc() -> impl Strategy<Value = TestDesc> {
        let addr = prop_oneof![
            HDR..MEM_SIZE as u64 + 0x1000,
            Just(HDR),
            Just(STATUS),
            any::<u64>(),
        ];
        let len = prop_oneof![
            0u32..2048,
            Just(16u32),
            Just(1u32),
            Just(512u32),
            any::<u32>()
        ];
        (addr, len, any::<bool>()).prop_map(|(addr, len, write)| TestDesc { addr, len, write })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_requests_never_panic(
            descs in prop::collection::vec(any_desc(), 1..8),
            req_type in prop_oneof![0u32..10, any::<u32>()],
            sector in prop_oneof![0..DISK_SECTORS + 2, any::<u64>()],
            read_only in any::<bool>(),
        ) {
            let mut h = Harness::new(read_only);
            h.header(req_type, sector);
            let len = h.run(&descs);
            prop_assert!(len <= (DISK_SECTORS * SECTOR_SIZE) as u32 + 1);
        }
    }
}
