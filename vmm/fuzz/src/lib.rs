//! What the fuzz targets share: a guest whose memory, and so whose virtqueue (descriptor
//! table, available ring, buffers), is the fuzzer's input, and a device run on it through the
//! same event loop and activation the VMM uses.
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::{Activation, GuestMemory, IrqTrigger, Queue, QueueT, VirtioDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size: small, so random addresses often land inside it.
pub const MEM_SIZE: usize = 0x1_0000;
/// Where each queue's rings sit: descriptors, then the available and used rings.
const RING_STRIDE: u64 = 0x400;

/// A queue size (a power of two up to 256) from the input's first byte, and the rest.
pub fn queue_size_and_rest(data: &[u8]) -> Option<(u16, u8, &[u8])> {
    let (&sel, rest) = data.split_first()?;
    Some((1u16 << (sel % 9), sel, rest))
}

/// Guest memory holding `data` from address 0 (the rest zero).
pub fn guest_memory(data: &[u8]) -> GuestMemory {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    mem
}

/// Queue `i` of size `size`, its rings at `i * RING_STRIDE`, as a driver would set it up.
fn queue(i: u64, size: u16) -> Queue {
    let mut q = Queue::new(size).unwrap();
    let base = i * RING_STRIDE;
    let desc = base;
    let avail = base + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    q
}

/// Activates `dev` with `queues` queues of `size` on `mem`, runs the event loop until it is
/// live, kicks every queue and runs the loop again: the device walks whatever the fuzzer put
/// in its rings.
pub fn run_device<D>(dev: D, mem: &GuestMemory, queues: usize, size: u16)
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    let dev = Arc::new(Mutex::new(dev));
    let mut em = EventManager::<Arc<Mutex<D>>>::new().unwrap();
    em.add_subscriber(dev.clone());
    let evts: Vec<EventFd> = (0..queues)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let kicks: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let activated = dev.lock().unwrap().activate(Activation {
        mem: mem.clone(),
        queues: (0..queues as u64).map(|i| queue(i, size)).collect(),
        queue_evts: evts,
        irq: IrqTrigger::new().unwrap(),
    });
    if activated.is_err() {
        return;
    }
    em.run_with_timeout(0).unwrap();
    for k in &kicks {
        k.write(1).unwrap();
    }
    // A few rounds: a device may take several (RX after TX, a muxer's replies).
    for _ in 0..4 {
        if em.run_with_timeout(0).unwrap() == 0 {
            break;
        }
    }
}
