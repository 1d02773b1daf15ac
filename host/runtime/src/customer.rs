//! What ferry's catalog accepts of a customer: a name, email, phone,
//! address and metadata, the limits on each, and how a connector's record
//! becomes one. The host checks the API's input and every remote record
//! with it; the test kit checks a connector's records with the same rules,
//! so a record the kit passes is one ferry takes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// A postal address. Every line is optional; unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// Street, PO box or company name.
    #[serde(default)]
    pub line1: Option<String>,
    /// Apartment, suite, unit or building.
    #[serde(default)]
    pub line2: Option<String>,
    /// City, district, suburb, town or village.
    #[serde(default)]
    pub city: Option<String>,
    /// ZIP or postal code.
    #[serde(default)]
    pub postal_code: Option<String>,
    /// State, county, province or region.
    #[serde(default)]
    pub state: Option<String>,
    /// Two-letter country code (ISO 3166-1 alpha-2).
    #[serde(default)]
    pub country: Option<String>,
}

/// A customer as given, before [`validate`].
#[derive(Debug, Clone, Default)]
pub struct CustomerInput {
    /// Full name or business name.
    pub name: Option<String>,
    /// Email.
    pub email: String,
    /// Phone number.
    pub phone: Option<String>,
    /// Postal address.
    pub address: Option<Address>,
    /// String pairs.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A customer's fields, validated and normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerFields {
    /// Full name or business name.
    pub name: Option<String>,
    /// Trimmed, lowercased email.
    pub email: String,
    /// Phone number as given (trimmed).
    pub phone: Option<String>,
    /// Postal address.
    pub address: Option<Address>,
    /// Free-form string key/value pairs.
    pub metadata: BTreeMap<String, String>,
}

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// Dotted path of the field (`email`, `address.city`, `metadata.plan`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldProblem {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The customer a connector's record (canonical JSON: `name`, `email`,
/// `phone`, `address`, `metadata`) makes, or why ferry cannot make one of
/// it (the inbound path dead-letters such an event, and a reconciliation
/// cannot import it). An email is needed; blank strings are no value;
/// a metadata value that is not a string is left out.
pub fn fields_of(record: &serde_json::Value) -> Result<CustomerFields, String> {
    judged(validate(input_of(record)?))
}

/// [`fields_of`] for a record of a stored customer, whose email stays
/// `kept` and is not judged again: the caller found the record's email to
/// be the customer's own (an email stored under older rules, with a
/// character today's refuse, made every change of the customer's other
/// fields fail).
pub fn fields_keeping_email(
    record: &serde_json::Value,
    kept: &str,
) -> Result<CustomerFields, String> {
    judged(validate_keeping_email(input_of(record)?, kept))
}

/// [`validate`] for a stored customer's input whose email stays `kept`,
/// whatever `input` says, and is not judged again (see
/// [`fields_keeping_email`]).
pub fn validate_keeping_email(
    input: CustomerInput,
    kept: &str,
) -> Result<CustomerFields, Vec<FieldProblem>> {
    let mut fields = validate(CustomerInput {
        email: KEPT_EMAIL_STAND_IN.to_owned(),
        ..input
    })?;
    kept.clone_into(&mut fields.email);
    Ok(fields)
}

/// What [`validate_keeping_email`] validates in the kept email's place.
const KEPT_EMAIL_STAND_IN: &str = "kept@example.com";

/// A record's fields as given, before [`validate`].
fn input_of(record: &serde_json::Value) -> Result<CustomerInput, String> {
    let text = |key: &str| {
        record
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let Some(email) = text("email") else {
        return Err("the remote record has no email; a customer needs one".into());
    };
    let address = record
        .get("address")
        .filter(|a| a.is_object())
        .and_then(|a| serde_json::from_value::<Address>(strip_empty(a)).ok())
        .filter(|a| *a != Address::default());
    let metadata = record
        .get("metadata")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Ok(CustomerInput {
        name: text("name"),
        email,
        phone: text("phone"),
        address,
        metadata: Some(metadata),
    })
}

/// [`validate`]'s problems as one line.
fn judged(validated: Result<CustomerFields, Vec<FieldProblem>>) -> Result<CustomerFields, String> {
    validated.map_err(|problems| {
        format!(
            "the remote record fails the catalog's validation: {}",
            problems
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// Drops blank strings (an unset line, as the contract says) and unknown
/// keys from an address object.
fn strip_empty(address: &serde_json::Value) -> serde_json::Value {
    let mut clean = serde_json::Map::new();
    for key in ["line1", "line2", "city", "state", "postal_code", "country"] {
        if let Some(value) = address
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|v| !v.trim().is_empty())
        {
            clean.insert(key.to_owned(), value.into());
        }
    }
    serde_json::Value::Object(clean)
}

/// Longest name, in characters.
pub const MAX_NAME: usize = 256;
/// Longest email, in bytes (RFC 5321 path limit).
pub const MAX_EMAIL: usize = 254;
/// Longest phone number, in characters.
pub const MAX_PHONE: usize = 40;
/// Longest address line, in characters.
pub const MAX_ADDRESS_LINE: usize = 200;
/// Most metadata keys: Stripe allows 50, and the Stripe connector adds
/// [`RESERVED_METADATA_KEY`] to every customer it writes.
pub const MAX_METADATA_KEYS: usize = 49;
/// The metadata key the Stripe connector writes ferry's customer id under
/// (and strips from what it reads back): a customer's own value there would
/// be overwritten remotely and dropped on the way back.
pub const RESERVED_METADATA_KEY: &str = "ferry_id";
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY: usize = 40;
/// Longest metadata value, in characters.
pub const MAX_METADATA_VALUE: usize = 500;
/// How emails are stored and compared: trimmed, lowercased (a final sigma
/// of the local part folded to `σ`), in Unicode
/// normal form C (an `é` typed as `e` and a combining accent is the same
/// address as one typed as one character), and with an internationalised
/// domain in its ASCII form (`bücher.de` and `xn--bcher-kva.de` are one
/// domain; the ASCII form is what every mail system and remote accepts). A
/// domain of anything but letters, digits, hyphens and dots, or one IDNA
/// refuses, is kept as given, for validation to refuse: IDNA's mapping
/// would otherwise accept a symbol (`☃.com`) or drop an invisible
/// character the check exists to catch.
pub fn normalise_email(email: &str) -> String {
    // Letter by letter, and in the local part the final sigma folded as
    // Unicode's case folding does: `str::to_lowercase` made a capital
    // sigma that ends a word a final sigma, so `ΑΣ@x.gr` and `ασ@x.gr`
    // were two customers, and by letter alone `ας@x.gr` and `ΑΣ@x.gr`
    // were. All three are one. Not in the domain: IDNA keeps the final
    // sigma a letter of its own (`ας.gr` and `ασ.gr` are two domains), and
    // folded there the address was stored, and pushed, under the other.
    let email: String = email
        .trim()
        .chars()
        .flat_map(char::to_lowercase)
        .nfc()
        .collect();
    let email = match email.rsplit_once('@') {
        Some((local, domain)) => format!("{}@{domain}", local.replace('ς', "σ")),
        None => email.replace('ς', "σ"),
    };
    let Some((local, domain)) = email.rsplit_once('@') else {
        return email;
    };
    if domain.is_ascii()
        || !domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '.')
    {
        return email;
    }
    match idna::domain_to_ascii(domain) {
        Ok(ascii) if !ascii.is_empty() => format!("{local}@{ascii}"),
        _ => email,
    }
}

/// A pragmatic email check, not RFC 5322: one `@`, a local part of 1-64
/// visible characters (no spaces, controls or format characters such as a
/// zero-width space or a byte-order mark, which would make a second
/// customer of one address that looks the same), and a domain of
/// dot-separated labels (letters, digits,
/// hyphens; no leading or trailing hyphen) with at least two labels, and,
/// when it is not ASCII, an ASCII form (IDNA refuses a label that starts
/// with a combining mark, or mixes directions: no mail system could reach
/// it, and a remote refuses it on every push). It
/// refuses what is certainly not deliverable and accepts what mail systems
/// accept; the only real check is sending a message.
pub fn is_valid_email(email: &str) -> bool {
    if email.len() > MAX_EMAIL {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| {
            !c.is_whitespace()
                && !c.is_control()
                && c.general_category() != GeneralCategory::Format
                && !is_default_ignorable(c)
                && !"@<>()[]\\,;:\"".contains(c)
        });
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && domain.len() <= 253
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
        && (domain.is_ascii() || idna::domain_to_ascii(domain).is_ok());
    local_ok && domain_ok
}

/// Unicode's `Default_Ignorable_Code_Point` characters outside the format
/// category (DerivedCoreProperties.txt, Unicode 15): drawn as nothing, and
/// untouched by NFC, so `ada\u{34f}@example.com` (a combining grapheme
/// joiner), a variation selector or a Hangul filler made a second customer
/// of an address that looks the same.
fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{034F}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

fn optional_text(
    errors: &mut Vec<FieldProblem>,
    field: &str,
    value: Option<String>,
    max: usize,
) -> Option<String> {
    let value = value?.trim().to_owned();
    if value.chars().any(char::is_control) {
        errors.push(FieldProblem::new(
            field,
            "must not contain control characters",
        ));
    } else if value.is_empty() {
        errors.push(FieldProblem::new(
            field,
            "must not be blank; send null to clear it",
        ));
    } else if value.chars().count() > max {
        errors.push(FieldProblem::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Some(value)
}

/// Whether `phone` reads as a phone number: digits, spaces and `+-()./`
/// (at least one digit), and an extension at the end (`x12`, `ext. 12`,
/// `#12`). Stripe and Salesforce take any text; what their users type
/// there (`+1 555 0100 x12`, `555/0100`) was refused, and an inbound
/// record carrying it was dead-lettered whole, its other changes with it.
pub fn is_phone(phone: &str) -> bool {
    let lower = phone.to_ascii_lowercase();
    let number = lower.trim_end();
    let digits = number.len() - number.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let number = if digits > 0 {
        let before = number[..number.len() - digits].trim_end();
        ["ext.", "ext", "x", "#"]
            .iter()
            .find_map(|marker| before.strip_suffix(marker))
            .map_or(number, |rest| rest.trim_end().trim_end_matches(','))
    } else {
        number
    };
    number.chars().any(|c| c.is_ascii_digit())
        && number
            .chars()
            .all(|c| c.is_ascii_digit() || " +-()./".contains(c))
}

/// Validates and normalises a request into the stored fields, reporting
/// every invalid field at once.
pub fn validate(input: CustomerInput) -> Result<CustomerFields, Vec<FieldProblem>> {
    let mut errors = Vec::new();
    let name = optional_text(&mut errors, "name", input.name, MAX_NAME);
    let email = normalise_email(&input.email);
    if !is_valid_email(&email) {
        errors.push(FieldProblem::new(
            "email",
            "must be an email address like name@example.com",
        ));
    }
    let phone = optional_text(&mut errors, "phone", input.phone, MAX_PHONE);
    if let Some(phone) = &phone {
        if !is_phone(phone) {
            errors.push(FieldProblem::new(
                "phone",
                "may contain only digits, spaces and +-()./, and an extension at the end \
                 (`x12`, `ext. 12`, `#12`)",
            ));
        }
    }
    let address = input.address.map(|a| Address {
        line1: optional_text(&mut errors, "address.line1", a.line1, MAX_ADDRESS_LINE),
        line2: optional_text(&mut errors, "address.line2", a.line2, MAX_ADDRESS_LINE),
        city: optional_text(&mut errors, "address.city", a.city, MAX_ADDRESS_LINE),
        postal_code: optional_text(
            &mut errors,
            "address.postal_code",
            a.postal_code,
            MAX_ADDRESS_LINE,
        ),
        state: optional_text(&mut errors, "address.state", a.state, MAX_ADDRESS_LINE),
        country: a.country.map(|c| c.trim().to_ascii_uppercase()),
    });
    // An address with no line set is no address, as an inbound record's
    // is: `{}` (or a patch clearing its last line) was stored as an
    // object of nulls, and the same customer read differently by the door
    // it came in by.
    let address = address.filter(|a| *a != Address::default());
    if let Some(country) = address.as_ref().and_then(|a| a.country.as_ref()) {
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            errors.push(FieldProblem::new(
                "address.country",
                "must be a two-letter country code",
            ));
        }
    }
    let metadata = input.metadata.unwrap_or_default();
    if metadata.len() > MAX_METADATA_KEYS {
        errors.push(FieldProblem::new(
            "metadata",
            format!("at most {MAX_METADATA_KEYS} keys"),
        ));
    }
    if metadata.contains_key(RESERVED_METADATA_KEY) {
        errors.push(FieldProblem::new(
            format!("metadata.{RESERVED_METADATA_KEY}"),
            "reserved: connectors write ferry's customer id under this key",
        ));
    }
    // Each key is looked at only when there are few enough of them: a
    // body of many bad keys answered several errors per key, each naming
    // it (an answer larger than the request).
    let keys = if metadata.len() > MAX_METADATA_KEYS {
        None
    } else {
        Some(&metadata)
    };
    for (key, value) in keys.into_iter().flatten() {
        // Named in an error as written, but no longer than a key may be.
        let named: String = key.chars().take(MAX_METADATA_KEY + 1).collect();
        // NUL cannot be stored by PostgreSQL (text or jsonb); refusing it
        // everywhere keeps both backends identical.
        if key.chars().any(char::is_control) || value.contains('\0') {
            errors.push(FieldProblem::new(
                format!("metadata.{}", named.escape_debug()),
                "keys must not contain control characters, values no NUL",
            ));
        }
        // Stripe refuses `[` and `]` in keys (they nest form fields), and
        // every push of such a customer would be dead-lettered.
        if key.contains(['[', ']']) {
            errors.push(FieldProblem::new(
                format!("metadata.{named}"),
                "keys must not contain square brackets",
            ));
        }
        if key.is_empty() || key.chars().count() > MAX_METADATA_KEY {
            errors.push(FieldProblem::new(
                format!("metadata.{named}"),
                format!("keys must be 1 to {MAX_METADATA_KEY} characters"),
            ));
        }
        if value.chars().count() > MAX_METADATA_VALUE {
            errors.push(FieldProblem::new(
                format!("metadata.{named}"),
                format!("values must be at most {MAX_METADATA_VALUE} characters"),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CustomerFields {
        name,
        email,
        phone,
        address,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_written_two_ways_is_one_email() {
        for (a, b) in [
            ("Ada@Example.com ", "ada@example.com"),
            // `é` as one character, and as `e` with a combining accent.
            ("ren\u{e9}@example.com", "rene\u{301}@example.com"),
            ("ada@B\u{dc}CHER.de", "ada@xn--bcher-kva.de"),
            ("ada@b\u{fc}cher.de", "ada@xn--bcher-kva.de"),
        ] {
            assert_eq!(normalise_email(a), normalise_email(b), "{a} / {b}");
        }
        assert_eq!(
            normalise_email("ada@b\u{fc}cher.de"),
            "ada@xn--bcher-kva.de"
        );
        assert_eq!(
            normalise_email("ren\u{e9}@example.com"),
            "ren\u{e9}@example.com"
        );
        // Not an email: left for validation to refuse, also when IDNA
        // would map it to something valid.
        assert_eq!(normalise_email("plain"), "plain");
        for symbol in [
            "ada@\u{2603}.com",
            "ada@exa\u{ad}mple.com",
            "ada@exa\u{200b}mple.com",
        ] {
            assert!(!is_valid_email(&normalise_email(symbol)), "{symbol}");
        }
        assert!(!is_valid_email(&normalise_email("a@-b.com")));
    }

    #[test]
    fn emails_that_mail_systems_accept_pass() {
        for email in [
            "ada@example.com",
            "a.b+tag@sub.example.co.uk",
            "o'brien@example.ie",
            "x@xn--80ak6aa92e.com",
            "ü@exämple.de",
        ] {
            assert!(is_valid_email(email), "{email}");
        }
    }

    #[test]
    fn what_is_not_an_email_fails() {
        for email in [
            "",
            "plain",
            "a@b",
            "a@@b.com",
            "a b@c.com",
            "a@-b.com",
            "a@b-.com",
            ".a@b.com",
            "a..b@c.com",
            "a@b..com",
            "<a>@b.com",
            // Letters to `char`, but no domain IDNA can write in ASCII:
            // a label starting with a combining mark, one mixing
            // directions.
            "a@\u{93f}b.com",
            "a@a\u{5d0}.com",
            // Drawn as nothing: the same address to the eye.
            "ada\u{34f}@example.com",
            "ada\u{fe0f}@example.com",
            "\u{3164}ada@example.com",
            "ada\u{e0041}@example.com",
        ] {
            assert!(!is_valid_email(email), "{email}");
        }
        assert!(!is_valid_email(&format!("{}@example.com", "a".repeat(65))));
    }

    #[test]
    fn phones_are_what_people_type() {
        for ok in [
            "+44 20 7946 0000",
            "(555) 010-0100",
            "555.0100",
            "555/0100",
            "+1 555 0100 x12",
            "+1 555 0100 ext. 12",
            "555-0100 EXT 7",
            "+44 (0)20 7946 0000 #3",
            "555 0100, x12",
        ] {
            assert!(is_phone(ok), "{ok}");
        }
        for bad in [
            "call me",
            "x12",
            "ext",
            "555-CALL",
            "555 0100 x",
            "555 0100 y12",
            "+-",
        ] {
            assert!(!is_phone(bad), "{bad}");
        }
    }

    #[test]
    fn normalisation_trims_and_lowercases() {
        assert_eq!(normalise_email("  Ada@Example.COM "), "ada@example.com");
        // One address whatever the case, wherever a capital sigma stands
        // (in the domain, IDNA's own mapping agrees).
        assert_eq!(
            normalise_email("ΑΣ@example.com"),
            normalise_email("ασ@example.com")
        );
        assert_eq!(normalise_email("a@ΑΣ.gr"), normalise_email("a@ασ.gr"));
        assert_eq!(
            normalise_email("ας@example.com"),
            normalise_email("ασ@example.com")
        );
        // Not in the domain: IDNA keeps a final sigma a letter of its own
        // (`ας.gr` and `ασ.gr` are two domains), and folded first the
        // address was stored under the other one, and pushed so.
        assert_eq!(
            normalise_email("a@ας.gr"),
            format!("a@{}", idna::domain_to_ascii("ας.gr").unwrap())
        );
        assert_ne!(normalise_email("a@ας.gr"), normalise_email("a@ασ.gr"));
    }
}
