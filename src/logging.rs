//! Log lines: env_logger with our own format, `2026-11-25T06:10:02.418Z INFO  module: message`.
//!
//! env_logger is built without its default features (no colour, no regex,
//! no humantime), so the UTC timestamp is formatted here.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Starts logging at `level` to stderr, or appending to the file `file`
/// (docker mode: dockerd sends stderr to /dev/null). RUST_LOG wins over -v/-q.
pub fn init(level: log::LevelFilter, file: Option<std::ffi::OsString>) {
    let mut b = env_logger::Builder::new();
    b.filter_level(level).format(|buf, record| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut stamp = [0u8; 24];
        utc_timestamp(now.as_secs(), now.subsec_millis(), &mut stamp);
        // The stamp is ASCII digits and punctuation by construction.
        let stamp = std::str::from_utf8(&stamp).unwrap_or("");
        writeln!(buf, "{stamp} {:<5} {}: {}", record.level(), record.target(), record.args())
    });
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    if let Some(path) = file {
        match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => {
                b.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(e) => eprintln!("splice-relay: cannot open log file {}: {e}", path.to_string_lossy()),
        }
    }
    let _ = b.try_init();
}

/// Writes `secs` (since the Unix epoch) and `millis` as RFC 3339 UTC,
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, into `out`.
pub fn utc_timestamp(secs: u64, millis: u32, out: &mut [u8; 24]) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let fields: [(usize, u64, usize); 7] = [
        (0, y as u64, 4),
        (5, m as u64, 2),
        (8, d as u64, 2),
        (11, rem / 3600, 2),
        (14, rem / 60 % 60, 2),
        (17, rem % 60, 2),
        (20, u64::from(millis.min(999)), 3),
    ];
    *out = *b"0000-00-00T00:00:00.000Z";
    for (at, mut v, width) in fields {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
}

/// The proleptic Gregorian date of a day count from 1970-01-01, by 400-year eras.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(secs: u64, millis: u32) -> String {
        let mut out = [0u8; 24];
        utc_timestamp(secs, millis, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn known_instants() {
        assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(stamp(951_782_400, 5), "2000-02-29T00:00:00.005Z"); // a 400-year leap day
        assert_eq!(stamp(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(stamp(1_798_761_599, 0), "2026-12-31T23:59:59.000Z");
        assert_eq!(stamp(4_107_542_400, 0), "2100-03-01T00:00:00.000Z"); // 2100 is no leap year
    }

    #[test]
    fn every_day_follows_the_last() {
        // Walk 1970..2400 a day at a time: dates strictly increase and are valid.
        let mut last = (1969, 12, 31);
        for day in 0..(430 * 366) {
            let (y, m, d) = civil_from_days(day);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            let next_ok = (y, m, d) == (last.0, last.1, last.2 + 1)
                || ((y, m, d) == (last.0, last.1 + 1, 1))
                || ((y, m, d) == (last.0 + 1, 1, 1) && last.1 == 12 && last.2 == 31);
            assert!(next_ok, "{last:?} -> {:?}", (y, m, d));
            last = (y, m, d);
        }
    }
}
