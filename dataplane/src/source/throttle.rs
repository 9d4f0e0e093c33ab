//! Bandwidth control: `max_rate` (and `max_rate_schedule`) in `[source]`.
//!
//! The pipeline's sender pays for every frame after sending it: a token bucket holding
//! at most a quarter second of the rate goes into debt by the frame's bytes, and the
//! sender sleeps the debt off before the next frame. So the bytes on the wire never
//! exceed the rate by more than one frame plus the bucket, over any interval, and the
//! guest is never stalled: the shim keeps accepting writes, which wait in the next,
//! larger epoch. The time slept is counted, so `ferry status` can say when the limit
//! holds replication back.
//!
//! A schedule rule `DAYS HH:MM-HH:MM = RATE` (days `Mon-Fri`, `Sat,Sun`, `*`; local
//! time; the end may be `24:00`) applies while the clock is in its window; the first
//! matching rule wins, else `max_rate`, else no limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate in bytes per second, parsed from `"200Mbit"`, `"1.5Gbit"`, `"50MiB/s"`, …
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

/// Why a rate or a schedule rule does not parse (the config names the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("{0:?} is not a rate: expected a number and a unit, e.g. \"200Mbit\", \"1Gbit\", \"50MiB/s\" (units: kbit, Mbit, Gbit, KB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s)")]
    Rate(String),
    #[error("{0:?} is not a schedule rule: expected \"DAYS HH:MM-HH:MM = RATE\", e.g. \"Mon-Fri 08:00-18:00 = 50Mbit\" (days: Mon..Sun, ranges, lists, or *)")]
    Rule(String),
}

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, RateError> {
        let bad = || RateError::Rate(text.to_string());
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, unit) = t.split_at(split);
        let n: f64 = number.parse().map_err(|_| bad())?;
        let factor = match unit.trim().to_ascii_lowercase().as_str() {
            "kbit" | "kbit/s" => 1e3 / 8.0,
            "mbit" | "mbit/s" => 1e6 / 8.0,
            "gbit" | "gbit/s" => 1e9 / 8.0,
            "kb/s" => 1e3,
            "mb/s" => 1e6,
            "gb/s" => 1e9,
            "kib/s" => 1024.0,
            "mib/s" => 1024.0 * 1024.0,
            "gib/s" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let rate = n * factor;
        // At least 64 KiB/s: slower, one frame would take longer than any timeout.
        if !(rate.is_finite() && rate >= 65536.0) {
            return Err(bad());
        }
        Ok(Rate(rate))
    }
}

/// One `max_rate_schedule` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Days it applies, Monday = bit 0.
    days: u8,
    /// Minutes since midnight, `[from, to)`.
    from: u32,
    to: u32,
    pub rate: Rate,
}

fn day(name: &str) -> Option<u32> {
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .iter()
        .position(|d| name.eq_ignore_ascii_case(d))
        .map(|i| i as u32)
}

fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

impl Rule {
    pub fn parse(text: &str) -> Result<Rule, RateError> {
        let bad = || RateError::Rule(text.to_string());
        let (when, rate) = text.split_once('=').ok_or_else(bad)?;
        let rate = Rate::parse(rate).map_err(|_| bad())?;
        let mut parts = when.split_whitespace();
        let (days, window) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
        if parts.next().is_some() {
            return Err(bad());
        }
        let mut mask = 0u8;
        for item in days.split(',') {
            if item == "*" {
                mask = 0x7f;
                continue;
            }
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (a, b) = (day(a).ok_or_else(bad)?, day(b).ok_or_else(bad)?);
            let mut d = a;
            loop {
                mask |= 1 << d;
                if d == b {
                    break;
                }
                d = (d + 1) % 7;
            }
        }
        let (from, to) = window.split_once('-').ok_or_else(bad)?;
        let (from, to) = (minutes(from).ok_or_else(bad)?, minutes(to).ok_or_else(bad)?);
        if from >= to {
            return Err(bad());
        }
        Ok(Rule {
            days: mask,
            from,
            to,
            rate,
        })
    }

    /// Whether the rule applies on weekday `weekday` (Monday = 0) at `minute`.
    fn applies(&self, weekday: u32, minute: u32) -> bool {
        self.days & (1 << weekday) != 0 && (self.from..self.to).contains(&minute)
    }
}

/// The limit of an engine: a default rate and schedule rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limit {
    pub default: Option<Rate>,
    pub rules: Vec<Rule>,
}

impl Limit {
    /// The rate in force now (local time), if any.
    pub fn now(&self) -> Option<Rate> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (weekday, minute) = crate::utc::local_weekday_minute(now);
        self.at(weekday, minute)
    }

    fn at(&self, weekday: u32, minute: u32) -> Option<Rate> {
        self.rules
            .iter()
            .find(|r| r.applies(weekday, minute))
            .map(|r| r.rate)
            .or(self.default)
    }

    pub fn is_unlimited(&self) -> bool {
        self.default.is_none() && self.rules.is_empty()
    }
}

/// The token bucket the sender pays into (see the module documentation).
#[derive(Debug)]
pub struct Throttle {
    limit: Limit,
    bucket: Mutex<Bucket>,
    /// Nanoseconds slept so far: how long the limit held replication back.
    held_ns: AtomicU64,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent at once; negative: a debt to sleep off.
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(limit: Limit) -> Throttle {
        Throttle {
            limit,
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
            held_ns: AtomicU64::new(0),
        }
    }

    /// `bytes` went on the wire: pays for them, sleeping while in debt.
    pub fn paid(&self, bytes: usize) {
        let Some(Rate(rate)) = self.limit.now() else {
            return;
        };
        let sleep = {
            let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let burst = rate / 4.0;
            b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
            b.last = now;
            b.tokens -= bytes as f64;
            (b.tokens < 0.0).then(|| Duration::from_secs_f64(-b.tokens / rate))
        };
        if let Some(d) = sleep {
            std::thread::sleep(d);
            self.held_ns
                .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Seconds the limit has held replication back so far.
    pub fn held_s(&self) -> f64 {
        self.held_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_bits_and_bytes_and_nonsense_is_refused() {
        assert_eq!(Rate::parse("200Mbit"), Ok(Rate(25e6)));
        assert_eq!(Rate::parse(" 1.5 Gbit "), Ok(Rate(187.5e6)));
        assert_eq!(Rate::parse("50MiB/s"), Ok(Rate(50.0 * 1048576.0)));
        for bad in [
            "",
            "fast",
            "200",
            "200 furlongs",
            "10kbit",
            "-5Mbit",
            "1e9Mbit",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn schedule_rules_parse_and_apply_by_day_and_time() {
        let r = Rule::parse("Mon-Fri 08:00-18:00 = 50Mbit").unwrap();
        assert!(r.applies(0, 8 * 60) && r.applies(4, 17 * 60 + 59));
        assert!(!r.applies(5, 12 * 60) && !r.applies(2, 18 * 60));
        let wrap = Rule::parse("Sat-Mon 00:00-24:00 = 1Gbit").unwrap();
        assert!(wrap.applies(5, 0) && wrap.applies(6, 1439) && wrap.applies(0, 720));
        assert!(!wrap.applies(1, 720));
        assert!(Rule::parse("* 22:00-23:30 = 10MB/s")
            .unwrap()
            .applies(3, 22 * 60));
        for bad in [
            "Mon-Fri 08:00-18:00",
            "Mon 18:00-08:00 = 1Mbit",
            "Funday 08:00-09:00 = 1Mbit",
            "Mon 08:00-25:00 = 1Mbit",
            "Mon 08:00-09:00 = lots",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?}");
        }
        let limit = Limit {
            default: Some(Rate(1e6)),
            rules: vec![r],
        };
        assert_eq!(limit.at(0, 9 * 60), Some(Rate(50e6 / 8.0)));
        assert_eq!(limit.at(6, 9 * 60), Some(Rate(1e6)));
    }

    #[test]
    fn the_bucket_holds_the_sender_to_the_rate() {
        let t = Throttle::new(Limit {
            default: Some(Rate(4e6)),
            rules: vec![],
        });
        let started = Instant::now();
        for _ in 0..20 {
            t.paid(200_000);
        }
        // 4 MB at 4 MB/s: about a second (less the quarter-second burst, never more
        // than the bucket ahead).
        let took = started.elapsed().as_secs_f64();
        assert!(took >= 0.7, "{took}");
        assert!(t.held_s() >= 0.7);
    }
}
