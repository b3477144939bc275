//! virtio-vsock packets the guest sends: any header (ops, ports, lengths, credit), any chain,
//! through the muxer (connection requests to host ports nobody listens on, RSTs, data).
#![no_main]
use husk_vmm_fuzz::{guest_memory, queue_size_and_rest, run_device};
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vsock::Vsock;

fuzz_target!(|data: &[u8]| {
    let Some((size, _, rest)) = queue_size_and_rest(data) else {
        return;
    };
    let mem = guest_memory(rest);
    let dir = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let Ok(vsock) = Vsock::new(3, &uds) else {
        return;
    };
    run_device(vsock, &mem, 3, size);
});
