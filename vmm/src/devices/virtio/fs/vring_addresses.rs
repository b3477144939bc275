//! What virtiofsd is told about guest memory and the rings (SET_MEM_TABLE, SET_VRING_ADDR):
//! host addresses, checked before any of them is sent.

use vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::devices::virtio::{ActivateError, GuestMemory, Queue, QueueT};

/// One vhost-user memory region per guest region; each must be backed by a file virtiofsd can
/// map.
pub(super) fn memory_regions(
    mem: &GuestMemory,
) -> Result<Vec<VhostUserMemoryRegionInfo>, ActivateError> {
    let regions = mem
        .iter()
        .map(|region| {
            if region.file_offset().is_none() {
                return Err(ActivateError::Backend(format!(
                    "virtio-fs needs memfd-backed guest memory so virtiofsd can map it: the region \
                     at {:#x} is anonymous (build guest memory with fs::shared_guest_memory)",
                    region.start_addr().raw_value()
                )));
            }
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|e| ActivateError::Backend(format!("virtio-fs: guest memory region: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if regions.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(ActivateError::Backend(format!(
            "virtio-fs: {} guest memory regions, vhost-user carries at most {MAX_ATTACHED_FD_ENTRIES}",
            regions.len()
        )));
    }
    Ok(regions)
}

/// The host addresses of a queue's rings, checked: each ring must lie inside one guest memory
/// region (virtiofsd gets host addresses, which are contiguous only within a mapping) and be
/// aligned as the virtio spec requires.
pub(super) fn vring_config(
    mem: &GuestMemory,
    index: usize,
    queue: &Queue,
    max_size: u16,
) -> Result<VringConfigData, ActivateError> {
    let size = queue.size();
    if size == 0 || !size.is_power_of_two() || size > max_size {
        return Err(ActivateError::Backend(format!(
            "virtio-fs: queue {index} has invalid size {size} (max {max_size})"
        )));
    }
    let n = u64::from(size);
    // Sizes include the event-index fields (used_event / avail_event) at the rings' ends.
    let desc = host_address(
        mem,
        index,
        "descriptor table",
        queue.desc_table(),
        16 * n,
        16,
    )?;
    let avail = host_address(
        mem,
        index,
        "available ring",
        queue.avail_ring(),
        6 + 2 * n,
        2,
    )?;
    let used = host_address(mem, index, "used ring", queue.used_ring(), 6 + 8 * n, 4)?;
    Ok(VringConfigData {
        queue_max_size: max_size,
        queue_size: size,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    })
}

fn host_address(
    mem: &GuestMemory,
    index: usize,
    what: &str,
    addr: u64,
    len: u64,
    align: u64,
) -> Result<u64, ActivateError> {
    let bad = |why: &str| {
        ActivateError::Backend(format!(
            "virtio-fs: queue {index} {what} at {addr:#x} ({len:#x} bytes) {why}"
        ))
    };
    // `align` is a power of two.
    if addr & (align - 1) != 0 {
        return Err(bad("is misaligned"));
    }
    let region = mem
        .find_region(GuestAddress(addr))
        .ok_or_else(|| bad("is outside guest memory"))?;
    let offset = addr - region.start_addr().raw_value();
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad("runs past the end of its memory region"));
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|e| bad(&e.to_string()))?;
    Ok(host as u64)
}
