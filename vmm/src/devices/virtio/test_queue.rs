use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, Activation, GuestMemory, IrqTrigger, VirtioDevice};
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

/// The activation cycle of a device with one queue, through the event loop: an activation
/// without its queue is refused; once activated, a kicked `request` is served, with an
/// interrupt; after a reset the old queue is dead; a second activation serves a new queue.
/// Returns the used lengths of the two requests served.
pub(crate) fn check_one_queue_activation_cycle<D>(
    device: D,
    mem: &GuestMemory,
    request: &[TestDesc],
) -> [u32; 2]
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    let activation = |queue: &mut TestQueue, evt: EventFd, irq: &IrqTrigger| Activation {
        mem: mem.clone(),
        queues: vec![queue.take_queue()],
        queue_evts: vec![evt],
        irq: irq.clone(),
    };
    let mut queue = TestQueue::new(mem, 0, 16);
    let mut em = EventManager::<D>::new().unwrap();
    let id = em.add_subscriber(device);
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = evt.try_clone().unwrap();
    let irq = IrqTrigger::new().unwrap();
    let dev = em.subscriber_mut(id).unwrap();
    assert!(!dev.is_activated());
    let err = dev
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![],
            queue_evts: vec![],
            irq: irq.clone(),
        })
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueCount { expected: 1, .. }));
    dev.activate(activation(&mut queue, evt, &irq)).unwrap();
    assert!(dev.is_activated());
    assert!(em.run_with_timeout(1000).unwrap() >= 1);
    queue.add(mem, request);
    kick.write(1).unwrap();
    assert!(em.run_with_timeout(1000).unwrap() >= 1);
    assert_eq!(queue.used_idx(mem), 1);
    assert_eq!(irq.evt.read().unwrap(), 1);

    let dev = em.subscriber_mut(id).unwrap();
    assert!(dev.reset());
    assert!(!dev.is_activated());
    em.run_with_timeout(100).unwrap();
    queue.add(mem, request);
    kick.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(
        queue.used_idx(mem),
        1,
        "a reset device served its old queue"
    );

    let mut second = TestQueue::new(mem, 0x4000, 16);
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = evt.try_clone().unwrap();
    em.subscriber_mut(id)
        .unwrap()
        .activate(activation(&mut second, evt, &irq))
        .unwrap();
    em.run_with_timeout(100).unwrap();
    second.add(mem, request);
    kick.write(1).unwrap();
    assert!(em.run_with_timeout(1000).unwrap() >= 1);
    assert_eq!(second.used_idx(mem), 1);
    [queue.used(mem, 0).1, second.used(mem, 0).1]
}
