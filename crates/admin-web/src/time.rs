//! The trace form's times: an HTML `datetime-local` value, read as UTC (the journal's clock).

/// "2026-03-02T10:00" (seconds optional) → unix seconds; None when empty or malformed.
pub fn parse_local(text: &str) -> Option<i64> {
    let (date, time) = text.trim().split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next().flatten().unwrap_or(0));
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || !(0..24).contains(&h) || !(0..60).contains(&min) || !(0..61).contains(&s) {
        return None;
    }
    Some(days_from_civil(y, m, day) * 86_400 + h * 3600 + min * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_times_are_read_as_utc() {
        assert_eq!(parse_local("1970-01-01T00:00"), Some(0));
        assert_eq!(parse_local("2026-03-02T10:00"), Some(1_772_445_600));
        assert_eq!(parse_local("2024-02-29T23:59:30"), Some(1_709_251_170));
        for bad in ["", "2026-13-01T00:00", "2026-03-02", "yesterday", "2026-03-02T25:00"] {
            assert_eq!(parse_local(bad), None, "{bad}");
        }
    }
}
