//! The virtio-mmio register file as a guest driver sees it: any sequence of 32-bit (and odd
//! sized) reads and writes at any offset, in any device status order, on a virtio-rng.
#![no_main]
use std::sync::{Arc, Mutex};

use husk_vmm_fuzz::guest_memory;
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::devices::virtio::rng::Rng;

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory(&[]);
    let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
    let Ok(mut t) = MmioTransport::new(mem, rng) else {
        return;
    };
    // Each op: kind (read/write, width), offset (16 bits), value (32 bits).
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let value = [op[3], op[4], op[5], op[6]];
        let width = [1, 2, 4, 8][usize::from(op[0] >> 1 & 3)];
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&value);
        if op[0] & 1 == 0 {
            t.read(offset, &mut buf[..width]);
        } else {
            t.write(offset, &buf[..width]);
        }
    }
});
