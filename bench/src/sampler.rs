//! The controller's resident memory and CPU, sampled from /proc every 200 ms.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    pub rss_mib: f64,
    /// CPU seconds used so far (user + system).
    pub cpu_s: f64,
}

/// Samples of whichever process is current (the controller is restarted during a run).
#[derive(Clone, Default)]
pub struct Sampler {
    samples: Arc<Mutex<Vec<(u32, Sample)>>>,
}

impl Sampler {
    pub fn watch(&self, pid: u32) {
        let samples = self.samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while let Some(sample) = read(pid) {
                samples
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((pid, sample));
                tick.tick().await;
            }
        });
    }

    fn of(&self, pid: u32, from: Instant, to: Instant) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(p, s)| *p == pid && s.at >= from && s.at <= to)
            .map(|(_, s)| *s)
            .collect()
    }

    /// Median RSS of `pid` in the window.
    pub fn rss_median(&self, pid: u32, from: Instant, to: Instant) -> Option<f64> {
        let rss: Vec<f64> = self.of(pid, from, to).iter().map(|s| s.rss_mib).collect();
        crate::results::quantile(&rss, 0.5)
    }

    /// Highest RSS of `pid` in the window.
    pub fn rss_peak(&self, pid: u32, from: Instant, to: Instant) -> Option<f64> {
        self.of(pid, from, to)
            .iter()
            .map(|s| s.rss_mib)
            .max_by(f64::total_cmp)
    }

    /// CPU seconds `pid` used in the window.
    pub fn cpu_seconds(&self, pid: u32, from: Instant, to: Instant) -> Option<f64> {
        let s = self.of(pid, from, to);
        Some(s.last()?.cpu_s - s.first()?.cpu_s)
    }

    /// CPU use of `pid` in the window, as a share of one core.
    pub fn cpu_share(&self, pid: u32, from: Instant, to: Instant) -> Option<f64> {
        let s = self.of(pid, from, to);
        let (first, last) = (s.first()?, s.last()?);
        let wall = last.at.duration_since(first.at).as_secs_f64();
        (wall > 0.0).then(|| (last.cpu_s - first.cpu_s) / wall)
    }
}

fn read(pid: u32) -> Option<Sample> {
    let at = Instant::now();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of stat; here indexes 11 and 12.
    let hz = clock_ticks();
    Some(Sample {
        at,
        rss_mib: rss_kib / 1024.0,
        cpu_s: (ticks(11)? + ticks(12)?) / hz,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}
