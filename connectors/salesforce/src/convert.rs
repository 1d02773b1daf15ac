//! The mapping between ferry's canonical customer and a Salesforce record:
//! which canonical path goes to which field (the default Contact mapping,
//! extended or overridden by the `field_map` setting), the name and street
//! splits, and Salesforce's timestamps.

use std::collections::BTreeMap;

use ferry_sdk::json::{Map, Value};
use ferry_sdk::{Address, ChangedFields, ConnectorError, Customer};

/// A place in the canonical customer a Salesforce field can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Path {
    /// The whole name in one field (an Account's `Name`).
    Name,
    /// All but the last word of the name (a Contact's `FirstName`), or
    /// fewer when they pass its 40 characters (see `split_name`).
    FirstName,
    /// The last word of the name (a Contact's `LastName`), or the last
    /// few; never empty, because Salesforce requires it.
    LastName,
    Email,
    Phone,
    /// `line1` and `line2` joined by a newline, as Salesforce's compound
    /// street fields hold them.
    Street,
    Line1,
    Line2,
    City,
    State,
    PostalCode,
    Country,
    /// One metadata entry.
    Metadata(String),
}

impl Path {
    fn parse(path: &str) -> Result<Self, ConnectorError> {
        Ok(match path {
            "name" => Self::Name,
            "name.first" => Self::FirstName,
            "name.last" => Self::LastName,
            "email" => Self::Email,
            "phone" => Self::Phone,
            "address.street" => Self::Street,
            "address.line1" => Self::Line1,
            "address.line2" => Self::Line2,
            "address.city" => Self::City,
            "address.state" => Self::State,
            "address.postal_code" => Self::PostalCode,
            "address.country" => Self::Country,
            _ => match path.strip_prefix("metadata.") {
                Some(key) if !key.is_empty() => Self::Metadata(key.to_owned()),
                _ => {
                    return Err(ConnectorError::permanent(format!(
                        "setting `field_map`: `{path}` is not a canonical customer path \
                         (name, name.first, name.last, email, phone, address.street, \
                         address.line1, address.line2, address.city, address.state, \
                         address.postal_code, address.country, metadata.KEY)"
                    )))
                }
            },
        })
    }

    /// Whether an update that changes `changed` writes this path's field
    /// (a name part whenever `name_changed`, the street whenever either
    /// line did).
    fn changed_by(&self, changed: &ChangedFields, name_changed: bool) -> bool {
        use Path::*;
        match self {
            Name | FirstName | LastName => name_changed,
            Email => changed.field("email"),
            Phone => changed.field("phone"),
            Street => changed.field("address.line1") || changed.field("address.line2"),
            Line1 => changed.field("address.line1"),
            Line2 => changed.field("address.line2"),
            City => changed.field("address.city"),
            State => changed.field("address.state"),
            PostalCode => changed.field("address.postal_code"),
            Country => changed.field("address.country"),
            Metadata(key) => changed.metadata(key),
        }
    }

    /// Paths that hold the same data as this one: mapping one replaces the
    /// others, so `{"name": "Name"}` alone turns a Contact mapping into an
    /// Account one.
    fn overlaps(&self, other: &Self) -> bool {
        use Path::*;
        matches!(
            (self, other),
            (Name, FirstName | LastName)
                | (FirstName | LastName, Name)
                | (Street, Line1 | Line2)
                | (Line1 | Line2, Street)
        ) || self == other
    }
}

/// Canonical paths and the Salesforce fields that hold them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldMap {
    entries: Vec<(Path, String)>,
}

impl Default for FieldMap {
    /// The Contact mapping.
    fn default() -> Self {
        let entries = [
            (Path::FirstName, "FirstName"),
            (Path::LastName, "LastName"),
            (Path::Email, "Email"),
            (Path::Phone, "Phone"),
            (Path::Street, "MailingStreet"),
            (Path::City, "MailingCity"),
            (Path::State, "MailingState"),
            (Path::PostalCode, "MailingPostalCode"),
            (Path::Country, "MailingCountry"),
        ];
        Self {
            entries: entries
                .into_iter()
                .map(|(p, f)| (p, f.to_owned()))
                .collect(),
        }
    }
}

/// Whether `name` can be a Salesforce API name (`Email`, `Tier__c`,
/// `ns__Field__c`). Checked because names go into SOQL and URL paths.
pub(crate) fn is_api_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= 120
}

impl FieldMap {
    /// The default mapping with the `field_map` setting's JSON object laid
    /// over it: a string maps a path, `null` or `""` drops a default one.
    pub(crate) fn with_overrides(json: Option<&str>) -> Result<Self, ConnectorError> {
        let mut map = Self::default();
        let Some(json) = json.map(str::trim).filter(|j| !j.is_empty()) else {
            return Ok(map);
        };
        let overrides: Map<String, Value> = ferry_sdk::json::from_str(json).map_err(|e| {
            ConnectorError::permanent(format!("setting `field_map` is not a JSON object: {e}"))
        })?;
        for (path, field) in overrides {
            let parsed = Path::parse(&path)?;
            map.entries.retain(|(p, _)| !p.overlaps(&parsed));
            match field {
                Value::Null => {}
                Value::String(f) if f.is_empty() => {}
                Value::String(f) if is_api_name(&f) => map.entries.push((parsed, f)),
                other => {
                    return Err(ConnectorError::permanent(format!(
                        "setting `field_map`: `{path}` maps to {other}, not a Salesforce field name"
                    )))
                }
            }
        }
        let mut seen = BTreeMap::new();
        for (path, field) in &map.entries {
            if let Some(previous) = seen.insert(field.to_ascii_lowercase(), path) {
                return Err(ConnectorError::permanent(format!(
                    "setting `field_map`: field `{field}` holds both {previous:?} and {path:?}"
                )));
            }
        }
        Ok(map)
    }

    /// The mapped Salesforce fields an update of `c` that changes
    /// `changed` writes ([`Customer::changed_fields`]). The name's fields
    /// whenever the name changed, or the stand-in a nameless customer's
    /// required name holds (made from the email, [`stand_in`]), kept
    /// readable as the Contact's name in Salesforce.
    pub(crate) fn changed(&self, c: &Customer, changed: &ChangedFields) -> Vec<&str> {
        let name_changed = changed.field("name") || (c.name.is_none() && changed.field("email"));
        self.entries
            .iter()
            .filter(|(path, _)| path.changed_by(changed, name_changed))
            .map(|(_, field)| field.as_str())
            .collect()
    }

    /// The mapped Salesforce fields, in mapping order.
    pub(crate) fn fields(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(_, f)| f.as_str())
    }

    /// The body of a create (absent values left out) or an update (absent
    /// values sent as `null`, so a field cleared in ferry clears in
    /// Salesforce).
    pub(crate) fn to_sobject(&self, c: &Customer, update: bool) -> Map<String, Value> {
        let (first, last) = split_name(c.name.as_deref());
        let address = c.address.clone().unwrap_or_default();
        let mut out = Map::new();
        for (path, field) in &self.entries {
            let value = match path {
                // Required whole (an Account's `Name`) or in part (a
                // Contact's `LastName`): never empty.
                Path::Name => Some(c.name.clone().unwrap_or_else(|| stand_in(c))),
                Path::FirstName => first.clone(),
                Path::LastName => Some(last.clone().unwrap_or_else(|| stand_in(c))),
                Path::Email => c.email.clone(),
                Path::Phone => c.phone.clone(),
                Path::Street => street(&address),
                Path::Line1 => address.line1.clone(),
                Path::Line2 => address.line2.clone(),
                Path::City => address.city.clone(),
                Path::State => address.state.clone(),
                Path::PostalCode => address.postal_code.clone(),
                Path::Country => address.country.clone(),
                Path::Metadata(key) => c.metadata.get(key).cloned(),
            };
            match value.filter(|v| !v.is_empty()) {
                Some(v) => {
                    out.insert(field.clone(), Value::String(v));
                }
                None if update => {
                    out.insert(field.clone(), Value::Null);
                }
                None => {}
            }
        }
        out
    }

    /// The first mapped field `fields` does not carry (compared
    /// case-insensitively), if any. An Outbound Message leaves out both the
    /// fields that are empty and those it was not set up to send, so such
    /// a field may hold a value the message cannot tell.
    pub(crate) fn missing_from<'a>(&'a self, fields: &Map<String, Value>) -> Option<&'a str> {
        self.entries
            .iter()
            .map(|(_, field)| field.as_str())
            .find(|field| !fields.keys().any(|k| k.eq_ignore_ascii_case(field)))
    }

    /// The fields that hold the name: whole (an Account's `Name`) or in
    /// parts.
    pub(crate) fn name_fields(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(path, _)| matches!(path, Path::Name | Path::FirstName | Path::LastName))
            .map(|(_, field)| field.as_str())
            .collect()
    }

    /// The fields the mapping splits the name into (a Contact's
    /// `FirstName` and `LastName`); empty when it maps the name whole.
    pub(crate) fn name_part_fields(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(path, _)| matches!(path, Path::FirstName | Path::LastName))
            .map(|(_, field)| field.as_str())
            .collect()
    }

    /// The name's parts as the record holds them, when they already make up
    /// `name` (compared word by word): an update then leaves them alone.
    /// ferry's split is a guess (the last word is the last name), and must
    /// not turn "Ludwig" "van Beethoven" into "Ludwig van" "Beethoven".
    pub(crate) fn name_parts_to_keep(
        &self,
        current: &Map<String, Value>,
        name: Option<&str>,
    ) -> Option<Map<String, Value>> {
        // The name as the parts read back, exactly: one they hold with
        // other spacing is written again (whole, see `split_name`).
        let held = self.customer_from("", current).name?;
        if held != name? {
            return None;
        }
        let by_lower: BTreeMap<String, &Value> = current
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let kept = self
            .name_part_fields()
            .into_iter()
            .map(|field| {
                let value = by_lower
                    .get(&field.to_ascii_lowercase())
                    .and_then(|v| text(v))
                    .map_or(Value::Null, Value::String);
                (field.to_owned(), value)
            })
            .collect();
        Some(kept)
    }

    /// The canonical customer held by a record's fields (REST JSON, or an
    /// outbound message's elements as strings). Field names compare
    /// case-insensitively, as Salesforce's do.
    pub(crate) fn customer_from(&self, remote_id: &str, fields: &Map<String, Value>) -> Customer {
        let by_lower: BTreeMap<String, &Value> = fields
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let get = |field: &str| {
            by_lower
                .get(&field.to_ascii_lowercase())
                .and_then(|v| text(v))
        };
        let mut c = Customer {
            id: Some(remote_id.to_owned()),
            ..Customer::default()
        };
        let mut address = Address::default();
        let (mut first, mut last) = (None, None);
        for (path, field) in &self.entries {
            let value = get(field);
            match path {
                Path::Name => c.name = value,
                Path::FirstName => first = value,
                Path::LastName => last = value,
                Path::Email => c.email = value,
                Path::Phone => c.phone = value,
                Path::Street => {
                    let (l1, l2) = split_street(value);
                    address.line1 = l1;
                    address.line2 = l2;
                }
                Path::Line1 => address.line1 = value,
                Path::Line2 => address.line2 = value,
                Path::City => address.city = value,
                Path::State => address.state = value,
                Path::PostalCode => address.postal_code = value,
                Path::Country => address.country = value,
                Path::Metadata(key) => {
                    if let Some(v) = value {
                        c.metadata.insert(key.clone(), v);
                    }
                }
            }
        }
        let only_last = first.is_none();
        // A first name typed beside the stand-in (`LastName` is required,
        // so a person naming the Contact keeps it) is the name: joined,
        // `Ada ada (no name)` was taken for an edit, stored and pushed to
        // every other system, and split back as `Ada ada (no` and `name)`.
        if !only_last && last.as_deref().is_some_and(is_marked) {
            last = None;
        }
        if c.name.is_none() {
            let joined = [first, last].into_iter().flatten().collect::<Vec<_>>();
            if !joined.is_empty() {
                c.name = Some(joined.join(" "));
            }
        }
        // The stand-in `to_sobject` writes for a nameless customer is no
        // name: read back as one, it became the sync's base, and a person
        // naming the Contact was taken for an edit on both sides.
        if only_last && c.name.as_deref().is_some_and(|name| is_stand_in(name, &c)) {
            c.name = None;
        }
        if !address.is_empty() {
            c.address = Some(address);
        }
        c
    }
}

/// A field's value as text; `null` and `""` are "not known". A whole
/// number reads without a fraction: a Number field (a metadata key mapped
/// to one) holds the `"5"` ferry wrote and answers `5.0`, which read as
/// `"5.0"` was a remote edit, taken into ferry's metadata and sent to
/// every other system.
fn text(v: &Value) -> Option<String> {
    /// Below 2^53, where every whole `f64` is exact.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(match n.as_f64() {
            #[allow(clippy::cast_possible_truncation)] // whole, and within i64
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < EXACT => {
                format!("{}", f as i64)
            }
            _ => n.to_string(),
        }),
        other => Some(other.to_string()),
    }
}

/// `(first, last)`: the last space-separated word is the last name. A
/// name that reading the two back (joined by one space) would not give
/// again (two spaces in a row, a no-break or ideographic space between
/// words) goes whole into the last name: split, it read back changed, and
/// never matched ferry's again (every update wrote it, every
/// reconciliation found it different, and taking Salesforce's side
/// rewrote the name everywhere).
fn split_name(name: Option<&str>) -> (Option<String>, Option<String>) {
    let name = name.unwrap_or_default();
    let words: Vec<&str> = name.split_whitespace().collect();
    // Within `LastName`'s 80 characters: a longer one is split as any
    // other (read back with its spacing changed, but written).
    if words.len() > 1 && words.join(" ") != name && name.chars().count() <= MAX_LAST_NAME {
        return (None, Some(name.to_owned()));
    }
    match words.split_last() {
        None => (None, None),
        Some((last, [])) => (None, Some((*last).to_owned())),
        Some((last, rest)) => {
            let first = rest.join(" ");
            if first.chars().count() <= MAX_FIRST_NAME {
                return (Some(first), Some((*last).to_owned()));
            }
            // A long name ("Acme International Trading Company of London
            // Ltd"): words move from the first name to the last until
            // both fit (read back, joined by one space, it is the same
            // name); all in the first name, it was refused for good
            // (`STRING_TOO_LONG`). Neither fits: as before.
            (0..words.len())
                .rev()
                .map(|at| (words[..at].join(" "), words[at..].join(" ")))
                .find(|(first, last)| {
                    first.chars().count() <= MAX_FIRST_NAME && last.chars().count() <= MAX_LAST_NAME
                })
                .map_or((Some(first), Some((*last).to_owned())), |(first, last)| {
                    (Some(first).filter(|f| !f.is_empty()), Some(last))
                })
        }
    }
}

/// `Contact.FirstName`'s length, in characters.
const MAX_FIRST_NAME: usize = 40;

/// `Contact.LastName`'s length, in characters.
const MAX_LAST_NAME: usize = 80;

/// What marks a name as [`stand_in`].
const NO_NAME: &str = "(no name)";

/// `LastName` (a Contact's) and `Name` (an Account's, a custom object's)
/// are required: without a name, the e-mail's local part and
/// [`NO_NAME`] stand in (`ada (no name)`), or `(no name)` alone. Marked,
/// the stand-in reads as no name whatever the record's email says since:
/// the bare local part this connector wrote before was known only while
/// the email stayed (an email changed in Salesforce made `ada` a name
/// ferry never had, taken in and pushed to every other system), and
/// never with the email unmapped (an Account).
fn stand_in(c: &Customer) -> String {
    match local_part(c) {
        Some(local) => format!("{local} {NO_NAME}"),
        None => NO_NAME.to_owned(),
    }
}

/// Whether `name`, read alone from a record holding `c`, is a stand-in:
/// [`stand_in`]'s, or the bare local part (or `Unknown`) of the releases
/// before, which Contacts written then still hold.
fn is_stand_in(name: &str, c: &Customer) -> bool {
    is_marked(name) || name == local_part(c).unwrap_or("Unknown")
}

/// Whether `name` is [`stand_in`]'s, marked with [`NO_NAME`].
fn is_marked(name: &str) -> bool {
    name == NO_NAME
        || name
            .strip_suffix(NO_NAME)
            .is_some_and(|local| local.ends_with(' '))
}

fn local_part(c: &Customer) -> Option<&str> {
    c.email
        .as_deref()
        .and_then(|e| e.split('@').next())
        .map(str::trim)
        .filter(|local| !local.is_empty())
}

fn street(a: &Address) -> Option<String> {
    match (&a.line1, &a.line2) {
        (Some(l1), Some(l2)) if !l2.is_empty() => Some(format!("{l1}\n{l2}")),
        (Some(l1), _) => Some(l1.clone()),
        (None, l2) => l2.clone(),
    }
}

/// A street field back into `line1` and `line2`: the first line, and the
/// others joined with `", "` (a textarea a person typed three lines into,
/// `\r\n` apart, as the UI stores them). Line breaks inside `line2` were
/// refused by ferry's validation as control characters: every event of the
/// Contact was dead-lettered for as long as its street stayed so.
fn split_street(street: Option<String>) -> (Option<String>, Option<String>) {
    let Some(street) = street else {
        return (None, None);
    };
    let mut lines = street
        .split('\n')
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.is_empty());
    let line1 = lines.next().map(str::to_owned);
    let rest: Vec<&str> = lines.collect();
    let line2 = (!rest.is_empty()).then(|| rest.join(", "));
    (line1, line2)
}

/// Milliseconds since the epoch of a Salesforce datetime:
/// `2026-11-29T08:00:00.000+0000`, also with `Z` or `+00:00`, with or
/// without fractional seconds.
pub(crate) fn parse_datetime_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let seps = s.as_bytes();
    if seps.get(4) != Some(&b'-')
        || seps.get(7) != Some(&b'-')
        || !matches!(seps.get(10), Some(b'T' | b't' | b' '))
        || seps.get(13) != Some(&b':')
        || seps.get(16) != Some(&b':')
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
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
            let h: i64 = digits[..2].parse().ok()?;
            let m: i64 = digits[2..].parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use ferry_sdk::json::json;

    use super::*;

    fn customer(name: Option<&str>, email: Option<&str>) -> Customer {
        Customer {
            name: name.map(str::to_owned),
            email: email.map(str::to_owned),
            ..Customer::default()
        }
    }

    #[test]
    fn the_last_name_stand_in_reads_as_no_name() {
        let map = FieldMap::default();
        for customer in [
            customer(None, Some("ada@example.com")),
            customer(None, None),
        ] {
            let written = map.to_sobject(&customer, false);
            let read = map.customer_from("003A", &written);
            assert_eq!(read.name, None, "{written:?}");
        }
        // Its email changed in Salesforce since: still no name.
        let mut written = map.to_sobject(&customer(None, Some("ada@example.com")), false);
        written.insert("Email".into(), json!("bob@example.com"));
        assert_eq!(map.customer_from("003A", &written).name, None);
        // The bare local part an earlier release wrote, while the email
        // stays, is no name either.
        let earlier = json!({"LastName": "ada", "Email": "ada@example.com"});
        let read = map.customer_from("003A", earlier.as_object().unwrap());
        assert_eq!(read.name, None);
        // A name with a first name is a name, whatever its last word.
        let named = customer(Some("Countess ada"), Some("ada@example.com"));
        let read = map.customer_from("003A", &map.to_sobject(&named, false));
        assert_eq!(read.name.as_deref(), Some("Countess ada"));
        // A first name typed beside the stand-in is the name alone.
        let mut written = map.to_sobject(&customer(None, Some("ada@example.com")), false);
        written.insert("FirstName".into(), json!("Ada"));
        assert_eq!(
            map.customer_from("003A", &written).name.as_deref(),
            Some("Ada")
        );
        written.insert("LastName".into(), json!("(no name)"));
        assert_eq!(
            map.customer_from("003A", &written).name.as_deref(),
            Some("Ada")
        );
    }

    /// A metadata key mapped to a Number field reads back as written: `5`,
    /// not the `5.0` Salesforce answers.
    #[test]
    fn a_whole_number_reads_without_a_fraction() {
        for (answer, read) in [
            (json!(5.0), Some("5")),
            (json!(-12.0), Some("-12")),
            (json!(5), Some("5")),
            (json!(2.5), Some("2.5")),
            (json!(1e300), Some("1e+300")),
            (json!(true), Some("true")),
            (json!(null), None),
        ] {
            assert_eq!(text(&answer).as_deref(), read, "{answer}");
        }
    }

    #[test]
    fn a_street_of_several_lines_reads_as_two() {
        let split = |s: &str| split_street(Some(s.to_owned()));
        assert_eq!(
            split("c/o Acme\r\n1 Road\r\nFlat 2"),
            (
                Some("c/o Acme".to_owned()),
                Some("1 Road, Flat 2".to_owned())
            )
        );
        assert_eq!(
            split("1 Road\n\nFlat 2\n"),
            (Some("1 Road".to_owned()), Some("Flat 2".to_owned()))
        );
        assert_eq!(split("1 Road\r"), (Some("1 Road".to_owned()), None));
        assert_eq!(split(""), (None, None));
        // What ferry writes reads back as it was.
        let address = Address {
            line1: Some("1 Road".into()),
            line2: Some("Flat 2, Floor 3".into()),
            ..Address::default()
        };
        assert_eq!(
            split_street(street(&address)),
            (address.line1.clone(), address.line2.clone())
        );
    }

    #[test]
    fn names_split_on_the_last_word_and_last_name_is_never_empty() {
        let map = FieldMap::default();
        let body = map.to_sobject(&customer(Some("Ada King Lovelace"), None), false);
        assert_eq!(body["FirstName"], "Ada King");
        assert_eq!(body["LastName"], "Lovelace");
        // Spacing the parts could not give back goes whole, and reads back
        // as written.
        for name in [
            "Ada  King Lovelace",
            "山田\u{3000}太郎",
            "Ada\u{a0}Lovelace",
        ] {
            let body = map.to_sobject(&customer(Some(name), None), false);
            assert_eq!(body.get("FirstName"), None, "{name:?}");
            assert_eq!(body["LastName"], name);
            assert_eq!(map.customer_from("003A", &body).name.as_deref(), Some(name));
        }
        // Not beyond what `LastName` holds.
        let long = format!("{}  Lovelace", "A".repeat(75));
        let body = map.to_sobject(&customer(Some(&long), None), false);
        assert_eq!(body["LastName"], "Lovelace");
        let body = map.to_sobject(&customer(Some("Cher"), None), false);
        assert_eq!(body.get("FirstName"), None);
        assert_eq!(body["LastName"], "Cher");
        let body = map.to_sobject(&customer(None, Some("ada@example.com")), true);
        assert_eq!(body["LastName"], "ada (no name)");
        assert_eq!(body["FirstName"], Value::Null);
        let body = map.to_sobject(&customer(None, None), true);
        assert_eq!(body["LastName"], "(no name)");
    }

    /// A name whose words but the last run past `FirstName`'s 40
    /// characters moves words into `LastName` until both fit, and reads
    /// back the same; all in `FirstName`, Salesforce refused it for good.
    #[test]
    fn a_long_name_is_split_where_both_parts_fit() {
        let map = FieldMap::default();
        let name = "Acme International Trading Company of London Ltd";
        let body = map.to_sobject(&customer(Some(name), None), false);
        assert_eq!(body["FirstName"], "Acme International Trading Company of");
        assert_eq!(body["LastName"], "London Ltd");
        assert_eq!(map.customer_from("003A", &body).name.as_deref(), Some(name));
        // A first word too long for `FirstName`: the name goes whole into
        // `LastName`.
        let long = format!("{} Ltd", "B".repeat(45));
        let body = map.to_sobject(&customer(Some(&long), None), false);
        assert_eq!(body.get("FirstName"), None, "{body:?}");
        assert_eq!(body["LastName"], long.as_str());
        assert_eq!(map.customer_from("003A", &body).name, Some(long));
    }

    #[test]
    fn a_whole_name_is_never_empty_either() {
        let map = FieldMap::with_overrides(Some(r#"{"name": "Name"}"#)).expect("map");
        let body = map.to_sobject(&customer(None, Some("ada@example.com")), true);
        assert_eq!(body["Name"], "ada (no name)");
        let body = map.to_sobject(&customer(None, None), false);
        assert_eq!(body["Name"], "(no name)");
        assert!(map.name_part_fields().is_empty());
        // An Account whose email is not mapped reads its stand-in as no
        // name too (it compared with `Unknown`, and read `ada` as a name).
        let account =
            FieldMap::with_overrides(Some(r#"{"name": "Name", "email": null}"#)).expect("map");
        let written = account.to_sobject(&customer(None, Some("ada@example.com")), false);
        assert_eq!(account.customer_from("001A", &written).name, None);
    }

    #[test]
    fn name_parts_that_make_up_the_name_are_kept() {
        let map = FieldMap::default();
        let held = json!({"FirstName": "Ludwig", "lastname": "van Beethoven"});
        let held = held.as_object().unwrap();
        let kept = map
            .name_parts_to_keep(held, Some("Ludwig van Beethoven"))
            .expect("the parts make up the name");
        assert_eq!(
            Value::Object(kept),
            json!({"FirstName": "Ludwig", "LastName": "van Beethoven"})
        );
        // A new name is split again, as is one the parts give back with
        // other spacing; no name keeps nothing.
        assert_eq!(map.name_parts_to_keep(held, Some("Ludwig Beethoven")), None);
        assert_eq!(
            map.name_parts_to_keep(held, Some("Ludwig  van Beethoven")),
            None
        );
        assert_eq!(map.name_parts_to_keep(held, None), None);
        let only_last = json!({"FirstName": null, "LastName": "Cher"});
        let kept = map
            .name_parts_to_keep(only_last.as_object().unwrap(), Some("Cher"))
            .expect("kept");
        assert_eq!(kept["FirstName"], Value::Null);
    }

    #[test]
    fn create_leaves_out_and_update_clears_absent_fields() {
        let map = FieldMap::default();
        let c = Customer {
            name: Some("Ada Lovelace".into()),
            address: Some(Address {
                line1: Some("12 St James's Sq".into()),
                line2: Some("Flat 1".into()),
                city: Some("London".into()),
                ..Address::default()
            }),
            ..Customer::default()
        };
        let create = map.to_sobject(&c, false);
        assert_eq!(create["MailingStreet"], "12 St James's Sq\nFlat 1");
        assert!(!create.contains_key("Phone"));
        let update = map.to_sobject(&c, true);
        assert_eq!(update["Phone"], Value::Null);
        assert_eq!(update["MailingCountry"], Value::Null);
        assert_eq!(update.len(), 9);
    }

    #[test]
    fn records_map_back_to_canonical() {
        let map = FieldMap::with_overrides(Some(r#"{"metadata.tier":"Tier__c"}"#)).unwrap();
        let fields = json!({"Id": "003x", "FirstName": "Ada", "LastName": "Lovelace",
            "email": "ada@example.com", "Phone": null, "MailingStreet": "1 Road\r\nFlat 2",
            "MailingCity": "London", "Tier__c": "gold", "Other__c": 5});
        let c = map.customer_from("003x", fields.as_object().unwrap());
        assert_eq!(c.id.as_deref(), Some("003x"));
        assert_eq!(c.name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(c.email.as_deref(), Some("ada@example.com"));
        assert_eq!(c.phone, None);
        let a = c.address.unwrap();
        assert_eq!(a.line1.as_deref(), Some("1 Road"));
        assert_eq!(a.line2.as_deref(), Some("Flat 2"));
        assert_eq!(c.metadata["tier"], "gold");
    }

    #[test]
    fn overrides_replace_overlapping_paths() {
        let map = FieldMap::with_overrides(Some(
            r#"{"name":"Name","address.street":"BillingStreet","phone":null,"email":""}"#,
        ))
        .unwrap();
        let fields: Vec<_> = map.fields().collect();
        assert!(fields.contains(&"Name"));
        assert!(!fields.contains(&"FirstName"));
        assert!(!fields.contains(&"LastName"));
        assert!(!fields.contains(&"MailingStreet"));
        assert!(!fields.contains(&"Phone"));
        assert!(!fields.contains(&"Email"));
        let body = map.to_sobject(&customer(Some("Acme Ltd"), None), false);
        assert_eq!(body["Name"], "Acme Ltd");

        let phone = FieldMap::with_overrides(Some(r#"{"phone":"MobilePhone"}"#)).unwrap();
        assert!(phone.fields().any(|f| f == "MobilePhone"));
        assert!(!phone.fields().any(|f| f == "Phone"));

        for bad in [
            r#"{"nickname":"X"}"#,
            r#"{"email":"Email; DROP"}"#,
            r#"{"email":"Phone"}"#,
            r#"["x"]"#,
        ] {
            assert!(FieldMap::with_overrides(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn salesforce_datetimes() {
        assert_eq!(
            parse_datetime_ms("1970-01-01T00:00:01.000+0000"),
            Some(1000)
        );
        assert_eq!(
            parse_datetime_ms("2026-11-29T08:00:00.000+0000"),
            Some(1_795_939_200_000)
        );
        assert_eq!(
            parse_datetime_ms("2026-11-29T08:00:00Z"),
            Some(1_795_939_200_000)
        );
        assert_eq!(
            parse_datetime_ms("2026-11-29T09:00:00.5+01:00"),
            Some(1_795_939_200_500)
        );
        assert_eq!(parse_datetime_ms("2026-11-29"), None);
        assert_eq!(parse_datetime_ms("2026-13-29T08:00:00Z"), None);
    }
}
