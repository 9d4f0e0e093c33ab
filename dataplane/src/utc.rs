//! Times in messages and listings, as UTC dates (`2026-12-06 05:45:23.646956367 UTC`):
//! an operator reading "the replica was modified at ..." or "promoted at ..." should
//! not have to convert Unix seconds. Listings read at the machine (`ferry points`)
//! show local times ([`Local`]), ages ([`Age`]) and sizes ([`Bytes`]).

/// A time in nanoseconds since the Unix epoch, as a UTC date and time
/// (`2026-12-06 05:45:23.646956367 UTC`).
pub struct Utc(pub i128);

impl Utc {
    /// Whole seconds since the Unix epoch.
    pub fn from_unix_s(s: u64) -> Utc {
        Utc(i128::from(s) * 1_000_000_000)
    }
}

impl std::fmt::Display for Utc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.div_euclid(1_000_000_000);
        let nanos = self.0.rem_euclid(1_000_000_000);
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )?;
        if nanos != 0 {
            write!(f, ".{nanos:09}")?;
        }
        f.write_str(" UTC")
    }
}

/// Whole seconds since the Unix epoch, as a date and time in the machine's local time
/// zone with its offset (`2026-12-06 06:45:23 +0100 CET`), for listings an operator
/// reads at that machine. Taken from the C library's `localtime_r` (the `TZ`
/// variable, else `/etc/localtime`); where it fails, shown as UTC.
pub struct Local(pub u64);

/// `unix_s` broken down in the machine's local time zone (`localtime_r`), if the C
/// library can.
fn local_tm(unix_s: u64) -> Option<libc::tm> {
    let t = libc::time_t::try_from(unix_s).ok()?;
    // SAFETY: `tm` is plain old data (integers and a pointer); all zeros is a valid
    // value of it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call, and localtime_r (the reentrant
    // form) keeps neither.
    let filled = unsafe { libc::localtime_r(&t, &mut tm) };
    (!filled.is_null()).then_some(tm)
}

/// The local weekday (Monday = 0) and minute of the day of `unix_s`, for schedules
/// written in local time; UTC where the local time zone cannot be had.
pub fn local_weekday_minute(unix_s: u64) -> (u32, u32) {
    match local_tm(unix_s) {
        Some(tm) => (
            (tm.tm_wday as u32 + 6) % 7,
            tm.tm_hour as u32 * 60 + tm.tm_min as u32,
        ),
        None => {
            let days = unix_s / 86_400;
            // 1970-01-01 was a Thursday (Monday = 0: 3).
            (((days + 3) % 7) as u32, (unix_s % 86_400 / 60) as u32)
        }
    }
}

impl std::fmt::Display for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(tm) = local_tm(self.0) else {
            return Utc::from_unix_s(self.0).fmt(f);
        };
        let off = tm.tm_gmtoff;
        let (sign, off) = if off < 0 { ('-', -off) } else { ('+', off) };
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {sign}{:02}{:02}",
            i64::from(tm.tm_year) + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec,
            off / 3600,
            off % 3600 / 60
        )?;
        if !tm.tm_zone.is_null() {
            // SAFETY: a non-null tm_zone points at a NUL-terminated static string of
            // the C library's time zone data.
            let zone = unsafe { std::ffi::CStr::from_ptr(tm.tm_zone) };
            if let Ok(zone) = zone.to_str() {
                if !zone.is_empty() && !zone.starts_with(['+', '-']) {
                    write!(f, " {zone}")?;
                }
            }
        }
        Ok(())
    }
}

/// A duration in seconds as an age an operator reads at a glance: `42s`, `5m 03s`,
/// `3h 12m`, `4d 06h`.
pub struct Age(pub u64);

impl std::fmt::Display for Age {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        match s {
            0..60 => write!(f, "{s}s"),
            60..3_600 => write!(f, "{}m {:02}s", s / 60, s % 60),
            3_600..86_400 => write!(f, "{}h {:02}m", s / 3_600, s % 3_600 / 60),
            _ => write!(f, "{}d {:02}h", s / 86_400, s % 86_400 / 3_600),
        }
    }
}

/// A size in bytes in binary units: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        write!(f, "{v:.1} {}", UNITS[unit])
    }
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`). Written out rather than taken from a date crate: it is the only
/// calendar arithmetic ferry needs.
fn civil_from_days(days: i128) -> (i128, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i128::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_weekday_and_minute_agree_with_the_local_listing() {
        let t = 1_796_535_923; // 2026-12-06 05:45:23 UTC
        let (_, minute) = local_weekday_minute(t);
        let shown = Local(t).to_string(); // "YYYY-MM-DD HH:MM:SS ..."
        let hm: Vec<u32> = shown[11..16]
            .split(':')
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(minute, hm[0] * 60 + hm[1], "{shown}");
        let mut days: Vec<u32> = (0..7)
            .map(|d| local_weekday_minute(t + d * 86_400).0)
            .collect();
        days.sort_unstable();
        assert_eq!(days, (0..7).collect::<Vec<_>>());
    }

    use super::{local_weekday_minute, Local, Utc};

    #[test]
    fn dates_across_leap_days_and_the_epoch() {
        assert_eq!(Utc(0).to_string(), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            Utc(951_782_400_000_000_000).to_string(),
            "2000-02-29 00:00:00 UTC"
        );
        assert_eq!(
            Utc::from_unix_s(1_796_535_923).to_string(),
            "2026-12-06 05:45:23 UTC"
        );
        assert_eq!(
            Utc(1_500_000_000).to_string(),
            "1970-01-01 00:00:01.500000000 UTC"
        );
        assert_eq!(Utc(-1).to_string(), "1969-12-31 23:59:59.999999999 UTC");
    }

    #[test]
    fn ages_and_sizes_read_at_a_glance() {
        use super::{Age, Bytes};
        assert_eq!(Age(42).to_string(), "42s");
        assert_eq!(Age(303).to_string(), "5m 03s");
        assert_eq!(Age(3 * 3600 + 720).to_string(), "3h 12m");
        assert_eq!(Age(4 * 86_400 + 6 * 3600).to_string(), "4d 06h");
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Bytes(12 << 20).to_string(), "12.0 MiB");
    }

    #[test]
    fn local_times_carry_their_offset() {
        let shown = super::Local(1_796_535_923).to_string();
        // The date part and a numeric offset, whatever the machine's zone is.
        assert!(shown.starts_with("2026-12-0"), "{shown}");
        assert!(shown.contains(" +") || shown.contains(" -"), "{shown}");
    }
}
