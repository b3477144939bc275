//! The smallest real KVM guest: 64-bit long mode, one port write, then HLT.
use std::time::Duration;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const MEM_SIZE: usize = 2 << 20;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const CODE: u64 = 0x8000;
const PORT: u16 = 0x10;

// mov rax, 0x1122334455667788; shr rax, 32; mov dx, 0x10; out dx, eax; hlt
// Only in 64-bit mode does the port see 0x11223344: in 32-bit mode the REX prefixes
// decode as `dec eax` and the immediate splits differently.
const CODE_BYTES: &[u8] = &[
    0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // mov rax, imm64
    0x48, 0xc1, 0xe8, 0x20, // shr rax, 32
    0x66, 0xba, 0x10, 0x00, // mov dx, 0x10
    0xef, // out dx, eax
    0xf4, // hlt
];

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

#[test]
fn long_mode_guest_writes_a_port_and_halts() {
    husk_tests::require_kvm();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let region = mem.iter().next().unwrap();
    let host_addr = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: host_addr,
        flags: 0,
    };
    // SAFETY: the region is a live mapping of `mem`, which outlives the VM in this test.
    unsafe { vm.set_user_memory_region(slot).unwrap() };

    // Flat GDT: null, 64-bit code, data.
    for (i, d) in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .iter()
        .enumerate()
    {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)).unwrap();
    }
    // Identity-map the first 2 MiB with one large page.
    mem.write_obj(PDPT | 0x3, GuestAddress(PML4)).unwrap();
    mem.write_obj(PD | 0x3, GuestAddress(PDPT)).unwrap();
    mem.write_obj(0x83u64, GuestAddress(PD)).unwrap();
    mem.write_slice(CODE_BYTES, GuestAddress(CODE)).unwrap();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 23;
    sregs.cs = segment(0x8, 0xb, true);
    let data = segment(0x10, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr3 = PML4;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 0x8000_0001; // PG | PE
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    // In a thread with a deadline: KVM_RUN of a guest that never exits would otherwise
    // block this test, and the lab, forever.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = None;
        loop {
            match vcpu.run().expect("KVM_RUN failed") {
                VcpuExit::IoOut(port, data) => seen = Some((port, data.to_vec())),
                VcpuExit::Hlt => break,
                other => panic!("unexpected exit {other:?}"),
            }
        }
        let _ = tx.send(seen);
    });
    let seen = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the guest did not halt within 60 s (or its vCPU thread failed, see above)");
    assert_eq!(seen, Some((PORT, vec![0x44, 0x33, 0x22, 0x11])));
}
