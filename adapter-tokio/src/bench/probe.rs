//! The node's CPU time and memory for `slim-tokio bench --node-pid PID`, read from Linux
//! `/proc/PID/stat` (utime + stime) and `/proc/PID/status` (VmRSS, VmHWM).
//!
//! The node may be any process (ours or the reference), so nothing is asked of it: the kernel's
//! accounting is the only source.

/// Where a node's numbers are read.
#[derive(Debug, Clone)]
pub struct NodeProbe {
    pid: u32,
    /// Clock ticks per second of `/proc/PID/stat` times (USER_HZ).
    ticks_per_s: f64,
    /// The peak RSS was reset when the probe was made, so VmHWM is this run's peak.
    peak_is_of_run: bool,
}

/// One reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeSample {
    /// User + system CPU time of all the node's threads since it started, in seconds.
    pub cpu_s: f64,
    pub rss_kib: u64,
    /// The highest RSS so far (since the reset, if it worked).
    pub peak_rss_kib: u64,
}

/// What the node spent during a bench.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeUsage {
    pub pid: u32,
    /// CPU seconds over the whole bench (throughput and round trips).
    pub cpu_s: f64,
    /// CPU seconds over the throughput phase.
    pub throughput_cpu_s: f64,
    /// `throughput_cpu_s` as a percentage of one core over the throughput phase.
    pub cpu_pct: f64,
    /// `throughput_cpu_s` per delivered message, in microseconds.
    pub cpu_us_per_msg: f64,
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub peak_rss_kib: u64,
    /// True when `peak_rss_kib` is the peak of this bench run (VmHWM was reset at its start);
    /// false when it is the peak of the node's whole life (the reset was not permitted).
    pub peak_is_of_run: bool,
}

impl NodeUsage {
    pub(crate) fn between(
        probe: &NodeProbe,
        start: &NodeSample,
        after_throughput: &NodeSample,
        end: &NodeSample,
        messages: u64,
        seconds: f64,
    ) -> NodeUsage {
        let throughput_cpu_s = (after_throughput.cpu_s - start.cpu_s).max(0.0);
        NodeUsage {
            pid: probe.pid,
            cpu_s: (end.cpu_s - start.cpu_s).max(0.0),
            throughput_cpu_s,
            cpu_pct: 100.0 * throughput_cpu_s / seconds.max(1e-9),
            cpu_us_per_msg: if messages == 0 {
                0.0
            } else {
                throughput_cpu_s * 1e6 / messages as f64
            },
            rss_start_kib: start.rss_kib,
            rss_end_kib: end.rss_kib,
            peak_rss_kib: end.peak_rss_kib.max(after_throughput.peak_rss_kib),
            peak_is_of_run: probe.peak_is_of_run,
        }
    }
}

impl NodeProbe {
    /// Checks that `/proc/PID` can be read, and resets the process's peak RSS so that VmHWM
    /// covers this run only (writing `5` to `clear_refs` resets just that counter, Linux ≥ 4.0;
    /// it needs the right to write there, i.e. the same user or root, and is skipped otherwise).
    pub fn new(pid: u32) -> Result<NodeProbe, String> {
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let mut probe = NodeProbe {
            pid,
            // 100 is USER_HZ on every Linux architecture we know of; sysconf failing is unheard of.
            ticks_per_s: if ticks > 0 { ticks as f64 } else { 100.0 },
            peak_is_of_run: false,
        };
        probe.sample()?;
        probe.peak_is_of_run = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        Ok(probe)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True when the peak RSS reported is this run's (see [`NodeProbe::new`]).
    pub fn peak_is_of_run(&self) -> bool {
        self.peak_is_of_run
    }

    pub fn sample(&self) -> Result<NodeSample, String> {
        let read = |file: &str| {
            std::fs::read_to_string(format!("/proc/{}/{file}", self.pid)).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    "no such process (has the node exited?)".to_owned()
                } else {
                    format!("/proc/{}/{file}: {e}", self.pid)
                }
            })
        };
        let stat = read("stat")?;
        let (utime, stime) = cpu_ticks(&stat)
            .ok_or_else(|| format!("/proc/{}/stat has an unexpected layout", self.pid))?;
        let status = read("status")?;
        let field = |key: &str| {
            status_kib(&status, key)
                .ok_or_else(|| format!("/proc/{}/status has no {key} line", self.pid))
        };
        Ok(NodeSample {
            cpu_s: (utime + stime) as f64 / self.ticks_per_s,
            rss_kib: field("VmRSS")?,
            peak_rss_kib: field("VmHWM")?,
        })
    }
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may itself contain spaces and parentheses, so fields are counted from
/// the last `)`.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name come field 3 (state) … field 13 (cmajflt): 11 fields, then utime, stime.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// A `Key:   1234 kB` line of `/proc/PID/status`, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (slim (node) x) S 1 4242 4242 0 -1 4194560 1234 0 5 0 \
                    731 264 0 0 20 0 3 0 81234 123456789 2345 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some((731, 264)));
        assert_eq!(cpu_ticks("4242 (short) S 1 2"), None);
        assert_eq!(cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn status_lines_in_kib() {
        let status = "Name:\tslim-tokio\nVmHWM:\t    6040 kB\nVmRSS:\t    5920 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(5920));
        assert_eq!(status_kib(status, "VmHWM"), Some(6040));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn this_process_can_be_probed() {
        let probe = NodeProbe::new(std::process::id()).unwrap();
        let sample = probe.sample().unwrap();
        assert!(sample.rss_kib > 0 && sample.peak_rss_kib >= sample.rss_kib / 2);
        assert!(sample.cpu_s >= 0.0);
        let gone = NodeProbe::new(u32::MAX).unwrap_err();
        assert!(gone.contains("no such process"), "{gone}");
    }
}
