//! Salesforce ids, datetimes and randomness for the fake.

use std::hash::BuildHasher;
use std::time::{SystemTime, UNIX_EPOCH};

/// The 3-character suffix that makes a 15-character id case-insensitively
/// unique: per 5-character chunk, a bitmap of its upper-case letters.
pub(super) fn id_suffix(id15: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    id15.as_bytes()
        .chunks(5)
        .map(|chunk| {
            let bits = chunk
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_ascii_uppercase())
                .fold(0usize, |acc, (i, _)| acc | (1 << i));
            char::from(ALPHABET[bits])
        })
        .collect()
}

pub(super) fn make_id(prefix: &str, seq: u64) -> String {
    let id15 = format!("{prefix}{seq:012}");
    let suffix = id_suffix(&id15);
    format!("{id15}{suffix}")
}

pub(super) fn key_prefix(object: &str) -> &'static str {
    match object {
        "Account" => "001",
        "Contact" => "003",
        "Opportunity" => "006",
        "Lead" => "00Q",
        _ => "a0X",
    }
}

/// Whether the org has `object`: the standard objects above, and any
/// custom one (`…__c`). Salesforce answers a URL naming another with 404
/// `NOT_FOUND`, and a query of one with 400 `INVALID_TYPE`.
pub(super) fn known_object(object: &str) -> bool {
    ["Account", "Contact", "Lead", "Opportunity"]
        .into_iter()
        .any(|known| known.eq_ignore_ascii_case(object))
        || (object.len() > 3 && object.to_ascii_lowercase().ends_with("__c"))
}

/// Standard objects have a fixed spelling; URLs may use any case.
pub(super) fn canonical_object(object: &str) -> String {
    ["Account", "Contact", "Lead", "Opportunity"]
        .into_iter()
        .find(|known| known.eq_ignore_ascii_case(object))
        .map_or_else(|| object.to_owned(), str::to_owned)
}

pub(super) fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::SeqCst))
}

pub(super) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
pub(super) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) -> days since 1970-01-01 (`days_from_civil`).
pub(super) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds since the epoch in the REST API's datetime format,
/// `2026-11-29T08:00:00.000+0000`. Fixed width, so strings sort in time
/// order.
pub(super) fn format_datetime(millis: i64) -> String {
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}+0000",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Parses a SOQL datetime literal (`2026-11-29T08:00:00Z`,
/// `2026-11-29T08:00:00.000+0000`, `...+01:00`) to milliseconds.
pub(super) fn parse_datetime(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if s.len() < 20 || s.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let ms: String = frac[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = ms.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_minutes = match rest {
        "Z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let digits: String = rest[1..].chars().filter(|c| *c != ':').collect();
            if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let hh: i64 = digits[..2].parse().ok()?;
            let mm: i64 = digits[2..].parse().ok()?;
            sign * (hh * 60 + mm)
        }
    };
    let month = u32::try_from(month).ok().filter(|m| (1..=12).contains(m))?;
    let day = u32::try_from(day).ok().filter(|d| (1..=31).contains(d))?;
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(secs * 1000 + millis)
}
