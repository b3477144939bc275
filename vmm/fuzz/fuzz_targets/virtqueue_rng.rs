//! virtio-rng walking a queue the guest wrote: arbitrary descriptor tables (indirect tables,
//! loops, out-of-range addresses and lengths) and available rings (wrap-around indices).
#![no_main]
use vmm::devices::virtio::rng::Rng;
use husk_vmm_fuzz::{guest_memory, run_device};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size_sel, rest)) = data.split_first() else {
        return;
    };
    let mem = guest_memory(rest);
    let size = 1u16 << (size_sel % 9);
    run_device(Rng::new().unwrap(), &mem, 1, size);
});
