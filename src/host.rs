//! Who and where this process is: the machine's boot id, its host name, and the start time
//! of a process. The crash journal uses the boot id to tell a crash of the mount process
//! (page cache intact) from a reboot; bucket leases use all three to tell whether the mount
//! that holds a lease still runs.
//!
//! Linux only, like FUSE itself: everything is read from `/proc`.

/// The id of the running boot of this machine, or empty when unknown.
pub fn boot_id() -> String {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

/// This machine's host name, or empty when unknown.
pub fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/PID/stat`);
/// `None` when there is no such process. Together with the pid it names one process: a pid
/// reused later has another start time.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or ')': the
    // fields that follow start after the last ')'. Field 3 is then the first of them.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_a_dead_pid_has_none() {
        let me = std::process::id();
        let start = process_start(me).expect("own start time");
        assert_eq!(process_start(me), Some(start));
        // Pids above the kernel's maximum (4194304) never exist.
        assert_eq!(process_start(4_194_305), None);
        assert!(!boot_id().is_empty());
    }
}
