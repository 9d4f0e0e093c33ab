//! Times in messages and listings, as UTC dates (`2026-12-06 05:45:23.646956367 UTC`):
//! an operator reading "the replica was modified at ..." or "promoted at ..." should
//! not have to convert Unix seconds.

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
    use super::Utc;

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
}
