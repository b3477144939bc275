//! virtio-vsock packets the guest sends: any header (ops, ports, lengths, credit), any chain,
//! through the muxer (connection requests to host ports nobody listens on, RSTs, data).
#![no_main]
use vmm::devices::virtio::vsock::Vsock;
use husk_vmm_fuzz::{guest_memory, run_device};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size_sel, rest)) = data.split_first() else {
        return;
    };
    let mem = guest_memory(rest);
    let size = 1u16 << (size_sel % 9);
    let dir = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let Ok(vsock) = Vsock::new(3, &uds) else {
        return;
    };
    run_device(vsock, &mem, 3, size);
});
