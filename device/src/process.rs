//! Process-wide protections for a process that holds private keys. It owns the process's
//! dumpable flag and nothing else; it never touches a key.

/// Makes this process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`): no core dump, and no
/// `ptrace` or `/proc/<pid>/mem` for other users. Every command that holds a private key calls
/// this first.
pub fn forbid_core_dumps() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_DUMPABLE takes one integer argument and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_can_be_made_non_dumpable() {
        forbid_core_dumps().expect("prctl");
        // SAFETY: PR_GET_DUMPABLE takes no pointers.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
