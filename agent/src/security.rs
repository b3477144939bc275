//! The security fields of a spec, checked and put in the form libcontainer (youki 0.7)
//! applies as runc does. libcontainer itself sets the user (uid, gid, additionalGids), the
//! capability sets (bounding dropped, then keep-caps across setuid, then capset and
//! ambient), no_new_privs, masked paths (/dev/null over files, a read-only tmpfs over
//! directories), read-only paths, the read-only root and the seccomp filter (compiled by
//! libseccomp, names unknown to the kernel skipped as runc does, loaded last before exec
//! when no_new_privs is set). Two places where it differs from runc are mended here:
//!
//! - `noNewPrivileges: false` (set, but false) makes libcontainer load the seccomp filter
//!   late, after the capabilities are gone, where the kernel refuses it (EACCES) without
//!   no_new_privs. runc loads it early in that case; an absent field does that here too,
//!   and false means the same as absent.
//! - `SCMP_CMP_MASKED_EQ`: the OCI spec (and runc, and moby's and containerd's default
//!   profiles) take `value` as the mask and `valueTwo` as the datum; libcontainer takes
//!   them the other way round, which would turn moby's "clone without namespace flags"
//!   rule into one that never matches. The two are swapped before libcontainer sees them.

use std::path::{Component, Path};

use oci_spec::runtime::{LinuxSeccompArgBuilder, LinuxSeccompOperator, Process, Spec};

use crate::error::{AgentError, Result};

/// Checks and normalises the security fields of a container's spec.
pub fn prepare(spec: &mut Spec) -> Result<()> {
    if let Some(p) = spec.process_mut().as_mut() {
        normalise_process(p);
    }
    let Some(linux) = spec.linux_mut().as_mut() else {
        return Ok(());
    };
    for (what, paths) in [
        ("linux.maskedPaths", linux.masked_paths()),
        ("linux.readonlyPaths", linux.readonly_paths()),
    ] {
        for p in paths.iter().flatten() {
            check_path(what, p)?;
        }
    }
    if let Some(mut seccomp) = linux.seccomp().clone() {
        if let Some(mut rules) = seccomp.syscalls().clone() {
            for rule in &mut rules {
                if let Some(mut args) = rule.args().clone() {
                    for a in &mut args {
                        if a.op() == LinuxSeccompOperator::ScmpCmpMaskedEq {
                            let (mask, datum) = (a.value(), a.value_two().unwrap_or(0));
                            *a = LinuxSeccompArgBuilder::default()
                                .index(a.index())
                                .op(a.op())
                                .value(datum)
                                .value_two(mask)
                                .build()
                                .map_err(|e| AgentError::internal("build a seccomp arg", e))?;
                        }
                    }
                    rule.set_args(Some(args));
                }
            }
            seccomp.set_syscalls(Some(rules));
        }
        linux.set_seccomp(Some(seccomp));
    }
    Ok(())
}

/// Normalises an exec's process (and a container's): see the module's first point.
pub fn normalise_process(p: &mut Process) {
    if p.no_new_privileges() == Some(false) {
        p.set_no_new_privileges(None);
    }
}

/// A masked or read-only path: absolute and without `..`. libcontainer applies it inside
/// the container's root (after pivot_root or chroot), where `..` cannot climb out of the
/// root either; refusing it keeps a spec's intent plain.
fn check_path(what: &str, p: &str) -> Result<()> {
    let path = Path::new(p);
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(AgentError::InvalidArgument(format!(
            "{what}: {p:?} must be an absolute path without '..'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(linux: serde_json::Value, nnp: Option<bool>) -> Spec {
        let mut process = json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
        if let Some(n) = nnp {
            process["noNewPrivileges"] = n.into();
        }
        serde_json::from_value(json!({"ociVersion": "1.0.2", "process": process, "linux": linux}))
            .unwrap()
    }

    #[test]
    fn masked_eq_operands_are_swapped_for_libcontainer() {
        let mut s = spec(
            json!({"seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288u64, "op": "SCMP_CMP_MASKED_EQ"},
                          {"index": 1, "value": 5, "op": "SCMP_CMP_EQ"}]}]}}),
            None,
        );
        prepare(&mut s).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        let args = &v["linux"]["seccomp"]["syscalls"][0]["args"];
        assert_eq!(args[0]["value"], 0);
        assert_eq!(args[0]["valueTwo"], 2114060288u64);
        assert_eq!(args[1]["value"], 5);
        assert!(args[1].get("valueTwo").is_none());
    }

    #[test]
    fn no_new_privileges_false_is_dropped_and_true_kept() {
        let mut s = spec(json!({}), Some(false));
        prepare(&mut s).unwrap();
        assert_eq!(s.process().as_ref().unwrap().no_new_privileges(), None);
        let mut s = spec(json!({}), Some(true));
        prepare(&mut s).unwrap();
        assert_eq!(
            s.process().as_ref().unwrap().no_new_privileges(),
            Some(true)
        );
    }

    #[test]
    fn masked_and_readonly_paths_must_be_absolute_without_dotdot() {
        for bad in ["proc/kcore", "/proc/../etc/shadow"] {
            let mut s = spec(json!({"maskedPaths": [bad]}), None);
            assert!(matches!(
                prepare(&mut s),
                Err(AgentError::InvalidArgument(_))
            ));
            let mut s = spec(json!({"readonlyPaths": [bad]}), None);
            assert!(matches!(
                prepare(&mut s),
                Err(AgentError::InvalidArgument(_))
            ));
        }
        let mut s = spec(json!({"maskedPaths": ["/proc/kcore"]}), None);
        prepare(&mut s).unwrap();
    }
}
