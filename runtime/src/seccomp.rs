//! `linux.seccomp`, compiled on the host with libseccomp into the classic BPF
//! program guest-init installs (the static guest init carries no libseccomp).
//! Semantics follow runc: unknown syscall names are skipped, a rule whose
//! action is the default action is redundant and skipped, and conditions on the
//! same argument index become separate rules (libseccomp allows one per index).

use std::str::FromStr;

use krun_oci_protocol::SeccompProgram;
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

use crate::error::{Error, Result};

const SECCOMP_FILTER_FLAG_LOG: u32 = 2;
const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u32 = 4;

fn invalid(what: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("seccomp: {what}"))
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction> {
    use LinuxSeccompAction::*;
    Ok(match a {
        ScmpActKill | ScmpActKillThread => ScmpAction::KillThread,
        ScmpActKillProcess => ScmpAction::KillProcess,
        ScmpActTrap => ScmpAction::Trap,
        ScmpActErrno => ScmpAction::Errno(errno.unwrap_or(libc::EPERM as u32) as i32),
        ScmpActTrace => ScmpAction::Trace(errno.unwrap_or(libc::EPERM as u32) as u16),
        ScmpActAllow => ScmpAction::Allow,
        ScmpActLog => ScmpAction::Log,
        // A listener would need an agent on the host side of the VM boundary.
        ScmpActNotify => return Err(invalid("SCMP_ACT_NOTIFY is not supported in a microVM")),
    })
}

fn compare(
    op: LinuxSeccompOperator,
    index: usize,
    value: u64,
    value_two: u64,
) -> Result<ScmpArgCompare> {
    use LinuxSeccompOperator::*;
    let index = u32::try_from(index).map_err(|_| invalid(format!("argument index {index}")))?;
    let op = match op {
        ScmpCmpNe => ScmpCompareOp::NotEqual,
        ScmpCmpLt => ScmpCompareOp::Less,
        ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        ScmpCmpEq => ScmpCompareOp::Equal,
        ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        ScmpCmpGt => ScmpCompareOp::Greater,
        // OCI: `value` is the mask, `valueTwo` the datum.
        ScmpCmpMaskedEq => {
            return Ok(ScmpArgCompare::new(
                index,
                ScmpCompareOp::MaskedEqual(value),
                value_two,
            ))
        }
    };
    Ok(ScmpArgCompare::new(index, op, value))
}

/// Compiles `seccomp` for the guest (x86_64 and whatever else it lists).
pub fn compile(seccomp: &LinuxSeccomp) -> Result<SeccompProgram> {
    let lib = |what: &str, e: libseccomp::error::SeccompError| invalid(format!("{what}: {e}"));
    let default = action(seccomp.default_action(), seccomp.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(|e| lib("new filter", e))?;
    // The filter is only exported here; the guest sets no_new_privs itself when asked.
    ctx.set_ctl_nnp(false).map_err(|e| lib("nnp", e))?;
    for arch in seccomp.architectures().iter().flatten() {
        let name = serde_json::to_value(arch)?;
        let name = name.as_str().unwrap_or_default();
        let arch = ScmpArch::from_str(name).map_err(|e| lib(name, e))?;
        ctx.add_arch(arch).map_err(|e| lib("add arch", e))?;
    }
    let mut flags = 0;
    for f in seccomp.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            // Guest-init installs the filter in a single-threaded child.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            // Only meaningful with a notify listener, which is refused above.
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        };
    }
    for rule in seccomp.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let mut conds = Vec::new();
        let mut indices = Vec::new();
        for a in rule.args().iter().flatten() {
            conds.push(compare(
                a.op(),
                a.index(),
                a.value(),
                a.value_two().unwrap_or(0),
            )?);
            indices.push(a.index());
        }
        let n_conds = indices.len();
        indices.sort_unstable();
        indices.dedup();
        let one_rule_per_condition = indices.len() != n_conds;
        for name in rule.names() {
            let Ok(sc) = ScmpSyscall::from_name(name) else {
                log::debug!("seccomp: unknown syscall {name:?} skipped");
                continue;
            };
            let added = if conds.is_empty() {
                ctx.add_rule(act, sc).map(drop)
            } else if one_rule_per_condition {
                conds
                    .iter()
                    .try_for_each(|c| ctx.add_rule_conditional(act, sc, &[*c]).map(drop))
            } else {
                ctx.add_rule_conditional(act, sc, &conds).map(drop)
            };
            added.map_err(|e| lib(&format!("rule for {name}"), e))?;
        }
    }
    let filter = export(&ctx)?;
    let program = SeccompProgram { flags, filter };
    program.insns().map_err(invalid)?;
    Ok(program)
}

/// The BPF program as bytes (libseccomp 2.5 exports to a file descriptor only).
fn export(ctx: &ScmpFilterContext) -> Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let fd =
        nix::sys::memfd::memfd_create(c"krun-oci-seccomp", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    ctx.export_bpf(&file)
        .map_err(|e| invalid(format!("export: {e}")))?;
    let mut out = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut out))
        .map_err(|e| invalid(format!("export: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seccomp(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn compiles_a_profile_like_podmans() {
        let s = seccomp(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["read", "write", "exit_group", "no_such_syscall_name"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                 "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"},
                          {"index": 0, "value": 17, "op": "SCMP_CMP_EQ"}]},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]
        }));
        let p = compile(&s).unwrap();
        assert!(p.insns().unwrap() > 10);
        assert_eq!(p.flags, 0);
    }

    #[test]
    fn flags_and_unsupported_actions() {
        let s = seccomp(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"],
            "syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"}]
        }));
        assert_eq!(compile(&s).unwrap().flags, SECCOMP_FILTER_FLAG_LOG);
        let s = seccomp(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_NOTIFY"}]
        }));
        assert!(compile(&s)
            .unwrap_err()
            .to_string()
            .contains("SCMP_ACT_NOTIFY"));
    }
}
