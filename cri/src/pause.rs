//! The sandbox (infra) container's program. A pod needs no pause image from any registry:
//! huskd writes this 129-byte static x86-64 ELF as `/pause` into the sandbox bundle's
//! rootfs. It loops on pause(2) forever; as PID 1 of the pod's PID namespace it ignores
//! signals it has no handler for, so it ends only by SIGKILL, which is how huskd stops a
//! sandbox task.

/// Where the ELF is loaded (the classic non-PIE base).
const BASE: u64 = 0x40_0000;
const EHDR: usize = 64;
const PHDR: usize = 56;

/// `mov eax, 34 (pause); syscall; jmp back to the mov`.
const CODE: [u8; 9] = [0xb8, 34, 0, 0, 0, 0x0f, 0x05, 0xeb, 0xf7];

/// The pause binary's bytes.
pub fn elf() -> Vec<u8> {
    let len = (EHDR + PHDR + CODE.len()) as u64;
    let mut b = Vec::with_capacity(len as usize);
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI, padding.
    b.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    b.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    b.extend_from_slice(&1u32.to_le_bytes()); // e_version
    b.extend_from_slice(&(BASE + (EHDR + PHDR) as u64).to_le_bytes()); // e_entry
    b.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    b.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    b.extend_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    b.extend_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    b.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    b.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
                                  // One PT_LOAD of the whole file, read + execute.
    b.extend_from_slice(&1u32.to_le_bytes()); // p_type
    b.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R|X
    b.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    b.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    b.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    b.extend_from_slice(&len.to_le_bytes()); // p_filesz
    b.extend_from_slice(&len.to_le_bytes()); // p_memsz
    b.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    b.extend_from_slice(&CODE);
    debug_assert_eq!(b.len() as u64, len);
    b
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;

    #[test]
    fn pause_runs_until_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pause");
        std::fs::write(&p, super::elf()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut child = std::process::Command::new(&p).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_none(), "pause exited early");
        // A signal with a handler-less default of "ignore" wakes pause(2) and it loops.
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGCHLD) };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            child.try_wait().unwrap().is_none(),
            "pause ended on SIGCHLD"
        );
        child.kill().unwrap();
        let st = child.wait().unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    }
}
