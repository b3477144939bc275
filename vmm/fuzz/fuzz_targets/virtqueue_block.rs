//! virtio-blk requests the guest wrote: any request type, sector, header and status
//! placement, chain shape, on a 1 MiB disk.
#![no_main]
use std::sync::OnceLock;

use vmm::devices::virtio::block::Block;
use husk_vmm_fuzz::{guest_memory, run_device};
use libfuzzer_sys::fuzz_target;

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
    let Some((&size_sel, rest)) = data.split_first() else {
        return;
    };
    let mem = guest_memory(rest);
    let size = 1u16 << (size_sel % 9);
    let blk = Block::new(disk(), size_sel & 0x80 != 0).unwrap();
    run_device(blk, &mem, 1, size);
});
