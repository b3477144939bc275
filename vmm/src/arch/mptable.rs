//! Intel MultiProcessor Specification 1.4 tables: without ACPI this is how the guest
//! kernel learns how many CPUs there are and where the IOAPIC is.
use vm_memory::{Bytes, GuestAddress};

use super::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR, LAST_IRQ};
use crate::devices::virtio::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

/// Builds the floating pointer + configuration table as bytes (pure, for tests).
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // cpu signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=LAST_IRQ as u8 {
        // I/O interrupt: type INT, default polarity/trigger, ISA bus irq -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 is ExtINT (the PIC), LINT1 is NMI on every CPU.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"HUSK-VMM    ");
    table.extend_from_slice(&[0; 6]); // OEM table pointer and size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = EBDA_START as u32 + 16;
    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (16 bytes), rev 1.4
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

pub fn setup(mem: &GuestMemory, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        let t = build(2).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        // second CPU is enabled but not the bootstrap processor
        assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
    }

    #[test]
    fn cpu_bounds() {
        assert!(build(0).is_err());
        assert!(build(255).is_err());
        assert!(build(254).is_ok());
    }
}
