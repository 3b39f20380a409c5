//! CPU time of the server's threads, read from /proc (Linux), so that the server's cost per
//! connection can be told apart from the client's in one process.

use std::time::Duration;

/// The name given to every thread of the servers' runtime.
pub const SERVER_THREAD_NAME: &str = "pc-bench-server";

/// Total user + system CPU time of this process's threads named [`SERVER_THREAD_NAME`], or
/// `None` where /proc is not available.
pub fn server_cpu_time() -> Option<Duration> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    // Clock ticks per second: 100 on every Linux this runs on (USER_HZ).
    const TICKS_PER_SEC: u64 = 100;
    let mut ticks = 0u64;
    for task in tasks.flatten() {
        let path = task.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        // The kernel keeps 15 bytes of a thread name.
        if !SERVER_THREAD_NAME.starts_with(comm.trim()) || comm.trim().len() < 8 {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the command name (which is in parentheses and may hold spaces).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
        let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        ticks += utime + stime;
    }
    Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SEC))
}

/// Resident memory of this process in bytes, or `None` where /proc is not available.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
