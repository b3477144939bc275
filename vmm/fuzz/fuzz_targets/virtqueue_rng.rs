//! virtio-rng walking a queue the guest wrote: arbitrary descriptor tables (indirect tables,
//! loops, out-of-range addresses and lengths) and available rings (wrap-around indices).
#![no_main]
use husk_vmm_fuzz::{guest_memory, queue_size_and_rest, run_device};
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::rng::Rng;

fuzz_target!(|data: &[u8]| {
    let Some((size, _, rest)) = queue_size_and_rest(data) else {
        return;
    };
    run_device(Rng::new().unwrap(), &guest_memory(rest), 1, size);
});
