//! husk-testinit: a tiny static PID 1 for guest tests of the VMM. It mounts the basics,
//! prints a marker on the console, writes the boot marker port, then does what the
//! `husk_test` kernel parameter asks and reboots (with `reboot=k`, that ends the VM).
use std::io::Write;

/// The VMM's boot-timer port and value (see vmm::devices::legacy::BOOT_MARKER_*).
const BOOT_MARKER_PORT: u16 = 0x3f0;
const BOOT_MARKER_VALUE: u8 = 123;

fn main() {
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    println!("husk-testinit: userspace reached");
    boot_marker();
    let test = std::env::var("husk_test").unwrap_or_else(|_| "boot".into());
    let ok = match test.as_str() {
        "boot" => true,
        other => {
            println!("husk-testinit: unknown test {other}");
            false
        }
    };
    println!("husk-testinit: {test} {}", if ok { "PASS" } else { "FAIL" });
    let _ = std::io::stdout().flush();
    // SAFETY: plain syscalls with constant arguments; as PID 1 we own the machine.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
}

fn mount(src: &str, dst: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(dst);
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (src, dst, fstype) = (c(src), c(dst), c(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        eprintln!(
            "husk-testinit: mount {dst:?}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn boot_marker() {
    // SAFETY: ioperm on one port for this process, then one byte out to it; the VMM
    // owns that port and only records the time.
    unsafe {
        if libc::ioperm(BOOT_MARKER_PORT.into(), 1, 1) == 0 {
            std::arch::asm!("out dx, al", in("dx") BOOT_MARKER_PORT, in("al") BOOT_MARKER_VALUE);
        }
    }
}
