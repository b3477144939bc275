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
