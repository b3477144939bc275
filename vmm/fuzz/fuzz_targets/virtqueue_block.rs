//! virtio-blk requests the guest wrote: any request type, sector, header and status
//! placement, chain shape, on a 1 MiB disk.
#![no_main]
use std::sync::OnceLock;

use husk_vmm_fuzz::{guest_memory, queue_size_and_rest, run_device};
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::Block;

fn disk() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("husk-fuzz-disk-{}", std::process::id()));
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((size, sel, rest)) = queue_size_and_rest(data) else {
        return;
    };
    let blk = Block::new(disk(), sel & 0x80 != 0).unwrap();
    run_device(blk, &guest_memory(rest), 1, size);
});
