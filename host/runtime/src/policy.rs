//! The outbound HTTP policy, applied before anything touches the wire: which
//! hosts a connector may reach, which addresses are never dialled, and where
//! `{{secret:NAME}}` placeholders are replaced by secret values.
//!
//! Pure functions over the manifest, the operator's settings and the request,
//! so every rule is unit-tested without a network.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use secrecy::{ExposeSecret, SecretString};
use url::{Host, Url};

/// Why the policy refused a request, mapped onto `http-error` at the boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PolicyError {
    /// `http-error.denied`: the request is well-formed but not allowed.
    Denied(String),
    /// `http-error.invalid-request`: the URL or a header is malformed.
    Invalid(String),
    /// `http-error.timeout`: the connector's request rate limit has no
    /// token left before the call's deadline. Passing: the same request
    /// goes through later, so the guest must see it as retryable (an SDK
    /// maps `denied` to a permanent failure, which would dead-letter a
    /// change over ferry's own pacing).
    Busy(String),
}

/// A host a connector may call: from the manifest's `hosts` (port `None`
/// means the scheme's default port) or from a host-setting URL (its port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeclaredHost {
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
}

impl DeclaredHost {
    /// Parses a manifest `hosts` entry, `host` or `host:port`, nothing else.
    pub(crate) fn from_manifest_entry(entry: &str) -> Result<Self, String> {
        let invalid = || format!("`{entry}` is not a host name or host:port");
        // Nor what the URL parser reads otherwise than it shows: `\` ends
        // the host, `%2E` decodes to a dot, tabs and line breaks vanish
        // (`evil.com\.api.stripe.com` declared `evil.com`).
        if entry.is_empty()
            || entry.contains(['/', '?', '#', '@', '*', '\\', '%'])
            || entry.contains(|c: char| c.is_whitespace() || c.is_control())
            || entry.contains("://")
        {
            return Err(invalid());
        }
        let url = Url::parse(&format!("https://{entry}")).map_err(|_| invalid())?;
        let host = url.host().map(normalize_host).ok_or_else(invalid)?;
        Ok(Self {
            host,
            port: url.port(),
        })
    }

    /// The host of a host-setting's value, a base URL such as
    /// `http://127.0.0.1:12111`; `None` if it is not an absolute http(s) URL.
    pub(crate) fn from_setting_url(value: &str) -> Option<Self> {
        let url = Url::parse(value).ok()?;
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        let host = url.host().map(normalize_host)?;
        Some(Self {
            host,
            port: url.port_or_known_default(),
        })
    }

    fn matches(&self, host: &str, url: &Url) -> bool {
        self.host == host
            && match self.port {
                None => url.port().is_none(),
                Some(port) => url.port_or_known_default() == Some(port),
            }
    }
}

/// Lower-cased host without a trailing dot; IP literals in canonical form.
pub(crate) fn normalize_host(host: Host<&str>) -> String {
    match host {
        Host::Domain(d) => d.trim_end_matches('.').to_ascii_lowercase(),
        Host::Ipv4(ip) => ip.to_string(),
        Host::Ipv6(ip) => ip.to_string(),
    }
}

/// The operator's rules on hosts, whatever the connector declares.
#[derive(Clone, Copy)]
pub(crate) struct OperatorHosts<'a> {
    /// The allow-list; empty allows every declared host.
    pub(crate) allowed: &'a [String],
    /// The deny-list; it wins over the allow-list.
    pub(crate) denied: &'a [String],
    /// Whether private addresses and plain `http://` are allowed.
    pub(crate) allow_private: bool,
}

impl OperatorHosts<'_> {
    /// Why the operator forbids `host`, if they do. A domain name that
    /// resolves to a private address is caught later, by the transport.
    pub(crate) fn refusal(&self, host: &str, ip: Option<IpAddr>) -> Option<String> {
        if self.denied.iter().any(|d| list_matches(d, host)) {
            return Some(format!("host `{host}` is on the operator's deny-list"));
        }
        // An IPv6 form of a denied IPv4 address (`[::ffff:93.184.216.34]`,
        // NAT64's `[64:ff9b::5db8:d822]`) reaches it as well, and matched
        // no entry written as the IPv4 address (nor the IPv4 address an
        // entry written in one of those forms).
        let reaches = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => embedded_v4(v6),
        };
        if let Some(v4) = ip.and_then(reaches) {
            let denied = self.denied.iter().any(|entry| {
                let entry = entry.trim();
                let entry = entry
                    .strip_prefix('[')
                    .and_then(|e| e.strip_suffix(']'))
                    .unwrap_or(entry);
                entry.parse::<IpAddr>().ok().and_then(reaches) == Some(v4)
            });
            if denied {
                return Some(format!(
                    "host `{host}` is {v4}, which is on the operator's deny-list"
                ));
            }
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|a| list_matches(a, host)) {
            return Some(format!("host `{host}` is not on the operator's allow-list"));
        }
        let private = match ip {
            Some(ip) => is_forbidden_ip(ip),
            None => host == "localhost" || host.ends_with(".localhost"),
        };
        if private && !self.allow_private {
            return Some(format!(
                "host `{host}` is a private, loopback or link-local address"
            ));
        }
        None
    }
}

/// What the policy needs to know about the operator and the connector.
pub(crate) struct HostRules<'a> {
    /// Hosts the manifest and its host-settings declare.
    pub(crate) declared: &'a [DeclaredHost],
    /// The operator's rules.
    pub(crate) operator: OperatorHosts<'a>,
}

/// Checks a manifest's declared hosts against the operator's rules when a
/// component is loaded, so a connector that could never run here is refused
/// up front instead of failing on its first request. Every problem, joined.
pub(crate) fn check_declared_hosts(
    hosts: &[DeclaredHost],
    operator: &OperatorHosts<'_>,
) -> Result<(), String> {
    let problems: Vec<String> = hosts
        .iter()
        .filter_map(|d| operator.refusal(&d.host, d.host.parse::<IpAddr>().ok()))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Checks `raw` against the rules and returns the parsed URL.
pub(crate) fn check_url(raw: &str, rules: &HostRules<'_>) -> Result<Url, PolicyError> {
    // The parser drops tabs and line breaks wherever they are, so
    // `/contacts/.\t.` is a `..` segment to it and not to the check below.
    if raw.bytes().any(|b| b.is_ascii_control()) {
        return Err(PolicyError::Invalid(
            "a URL with a control character (a tab, a line break)".into(),
        ));
    }
    let url = Url::parse(raw).map_err(|e| PolicyError::Invalid(format!("bad URL: {e}")))?;
    // Checked as the parser reads it: without the spaces it drops at
    // either end, `/contacts/.. ` is a `..` segment to it.
    if has_dot_segment(raw.trim_matches(' ')) {
        return Err(PolicyError::Invalid(
            "a URL path with a `.` or `..` segment (an id put into the path must not be one)"
                .into(),
        ));
    }
    match url.scheme() {
        "https" => {}
        // Plain HTTP is for local fakes in tests and development; in
        // production it would put secrets on the wire in clear text.
        "http" if rules.operator.allow_private => {}
        "http" => {
            return Err(PolicyError::Denied(
                "plain http:// is not allowed; use https://".into(),
            ))
        }
        other => {
            return Err(PolicyError::Invalid(format!(
                "unsupported URL scheme `{other}`"
            )))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(PolicyError::Invalid(
            "credentials in the URL are not allowed".into(),
        ));
    }
    let host_ref = url
        .host()
        .ok_or_else(|| PolicyError::Invalid("URL has no host".into()))?;
    let host = normalize_host(host_ref);
    if !rules.declared.iter().any(|d| d.matches(&host, &url)) {
        return Err(PolicyError::Denied(format!(
            "host `{host}` (port {}) is not declared in the connector's manifest",
            url.port_or_known_default().unwrap_or(0)
        )));
    }
    let ip = match url.host() {
        Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    };
    if let Some(refusal) = rules.operator.refusal(&host, ip) {
        return Err(PolicyError::Denied(refusal));
    }
    Ok(url)
}

/// Whether `raw`'s path holds a `.` or `..` segment, percent-encoded or
/// not: the URL parser resolves them away, so a remote id of `..` put into
/// `/v1/contacts/{id}` as one segment (encoded or not, `%2E%2E` is still a
/// dot segment to it) sent the request, the key with it, to `/v1/`.
fn has_dot_segment(raw: &str) -> bool {
    let rest = raw.split_once("://").map_or(raw, |(_, rest)| rest);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let Some(start) = rest.find(['/', '\\']) else {
        return false;
    };
    let path = &rest[start..];
    path.split(['/', '\\']).any(|segment| {
        let segment = segment.to_ascii_lowercase().replace("%2e", ".");
        segment == "." || segment == ".."
    })
}

/// Why `entry` cannot be an allow- or deny-list entry (an exact host or
/// `*.suffix`), if it cannot: a CIDR range (`10.0.0.0/8`), a port
/// (`api.example.com:443`) or a URL matched no host, and a deny-list
/// holding one denied nothing.
pub fn list_entry_problem(entry: &str) -> Option<String> {
    let name = entry.trim().trim_end_matches('.');
    let name = name.strip_prefix("*.").unwrap_or(name);
    // An IPv6 address is taken bare too, as hosts are written.
    let bare_ip = name.parse::<IpAddr>().is_ok();
    match Host::parse(name) {
        Ok(_) if !name.is_empty() && !name.contains('*') => None,
        _ if bare_ip => None,
        _ => Some(format!(
            "`{entry}` is not a host or `*.suffix` (ranges, ports, URLs and other wildcards are not taken)"
        )),
    }
}

/// An operator allow- or deny-list entry: an exact host or `*.suffix`.
/// The entry is written as hosts are ([`normalize_host`]): an entry
/// `bücher.example` or `[2606:4700::1111]` matched no host (they are
/// `xn--bcher-kva.example` and `2606:4700::1111` by then), and a deny-list
/// holding one denied nothing.
fn list_matches(entry: &str, host: &str) -> bool {
    let entry = entry.trim().trim_end_matches('.');
    let (wildcard, name) = match entry.strip_prefix("*.") {
        Some(suffix) => ("*.", suffix),
        None => ("", entry),
    };
    // A bare IPv6 address in any of its spellings (`2606:4700:0:0::1111`):
    // the host parser takes it bracketed only, and compared as text it
    // matched no host.
    let name = match name.parse::<IpAddr>().map_or_else(
        |_| Host::parse(name),
        |ip| match ip {
            IpAddr::V4(ip) => Ok(Host::Ipv4(ip)),
            IpAddr::V6(ip) => Ok(Host::Ipv6(ip)),
        },
    ) {
        Ok(Host::Domain(domain)) => normalize_host(Host::Domain(&domain)),
        Ok(Host::Ipv4(ip)) => normalize_host(Host::Ipv4(ip)),
        Ok(Host::Ipv6(ip)) => normalize_host(Host::Ipv6(ip)),
        Err(_) => name.to_ascii_lowercase(),
    };
    let entry = format!("{wildcard}{name}");
    match entry.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => entry == host,
    }
}

/// Addresses a connector must never reach unless the operator allows it:
/// loopback, private, link-local (cloud metadata), unique-local, CGNAT,
/// unspecified, multicast, broadcast, documentation and reserved ranges,
/// local-use NAT64, and IPv6 forms that embed such an IPv4 address
/// (IPv4-mapped, -compatible and -translated, NAT64, 6to4).
pub(crate) fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        if forbidden_v4(v4) {
            return true;
        }
    }
    let seg = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        // NAT64 for local use (RFC 8215), 64:ff9b:1::/48: local networks only.
        || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1)
}

/// The IPv4 address an IPv6 one carries, in the forms that reach it:
/// IPv4-mapped (`::ffff:0:0/96`), NAT64 (`64:ff9b::/96`), IPv4-compatible
/// (`::/96`, but for `::` and `::1`), IPv4-translated (`::ffff:0:0:0/96`,
/// RFC 2765) in the last 32 bits; 6to4 (`2002::/16`) in bits 16 to 48.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let last = |seg: &[u16; 8]| {
        Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        )
    };
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    match seg {
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => Some(last(&seg)),
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_loopback() && !ip.is_unspecified() => Some(last(&seg)),
        [0x2002, _, _, _, _, _, _, _] => Some(Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        )),
        _ => None,
    }
}

const SECRET_OPEN: &[u8] = b"{{secret:";
const TOKEN_OPEN: &[u8] = b"{{token:";
const PLACEHOLDER_CLOSE: &[u8] = b"}}";

/// Replaces every `{{secret:NAME}}` in `input` with the secret's value,
/// except the placeholders in `literal`: text the call's data holds (see
/// [`placeholders_in`]), which goes out as written.
///
/// A name the manifest does not declare, or one without a configured value,
/// denies the whole request: silently sending the literal placeholder would
/// hide a misconfiguration. Text that merely looks similar (no closing
/// braces, characters outside `[a-z0-9_]`) is left alone.
pub(crate) fn substitute_secrets(
    input: &[u8],
    declared: &[String],
    values: &BTreeMap<String, SecretString>,
    literal: &BTreeSet<Vec<u8>>,
) -> Result<Vec<u8>, PolicyError> {
    substitute(input, SECRET_OPEN, literal, |name| {
        if !declared.iter().any(|d| d == name) {
            return Err(PolicyError::Denied(format!(
                "secret `{name}` is not declared in the manifest"
            )));
        }
        values
            .get(name)
            .ok_or_else(|| PolicyError::Denied(format!("secret `{name}` has no value configured")))
    })
}

/// Replaces every `{{token:NAME}}` in `input` with the value of the OAuth
/// token this call obtained under `NAME` (see [`super::oauth`]).
pub(crate) fn substitute_tokens(
    input: &[u8],
    tokens: &BTreeMap<String, SecretString>,
) -> Result<Vec<u8>, PolicyError> {
    substitute(input, TOKEN_OPEN, &BTreeSet::new(), |name| {
        tokens.get(name).ok_or_else(|| {
            PolicyError::Denied(format!(
                "token `{name}` was not obtained in this call (call oauth.client-credentials-token first)"
            ))
        })
    })
}

/// How many placeholders one header value or body may hold. A request
/// names a key or a token once or twice; without a bound, a body of
/// millions of 12-byte placeholders grew on the host into copies of the
/// secret, outside the guest's memory cap.
const MAX_PLACEHOLDERS: usize = 64;

/// The placeholders (`{{secret:NAME}}`, `{{token:NAME}}`) that `data`
/// holds as text. A customer's name, a remote's answer, a webhook's body:
/// data a connector copies into a request body must reach the remote as
/// written, never as the secret it names (a customer named
/// `{{secret:client_secret}}` would otherwise carry the connector's
/// credential into the remote's record, for anyone who reads it there).
pub(crate) fn placeholders_in(data: &[u8]) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    for open in [SECRET_OPEN, TOKEN_OPEN] {
        let mut rest = data;
        while let Some(start) = find(rest, open) {
            let after_open = &rest[start + open.len()..];
            match placeholder_name_len(after_open) {
                Some(len) => {
                    let close = start + open.len() + len + PLACEHOLDER_CLOSE.len();
                    found.push(rest[start..close].to_vec());
                    rest = &rest[close..];
                }
                None => rest = after_open,
            }
        }
    }
    found
}

/// How many distinct placeholders of a call's data are kept: a remote
/// answering with a million of them would otherwise grow the set on the
/// host, outside the guest's memory cap.
const MAX_DATA_PLACEHOLDERS: usize = 1024;

/// The placeholder text a call's data held ([`placeholders_in`]), which
/// its request bodies send as written.
#[derive(Debug, Default)]
pub(crate) struct DataPlaceholders {
    seen: BTreeSet<Vec<u8>>,
    /// More than [`MAX_DATA_PLACEHOLDERS`]: no body of the call is
    /// substituted (the connector's own placeholders go as written too).
    overflow: bool,
}

impl DataPlaceholders {
    /// Notes the placeholders `data` holds.
    pub(crate) fn note(&mut self, data: &[u8]) {
        for placeholder in placeholders_in(data) {
            if self.seen.len() == MAX_DATA_PLACEHOLDERS {
                self.overflow = true;
                return;
            }
            self.seen.insert(placeholder);
        }
    }

    /// The placeholders a body sends as written; `None`: every one.
    pub(crate) fn literal(&self) -> Option<&BTreeSet<Vec<u8>>> {
        (!self.overflow).then_some(&self.seen)
    }
}

fn substitute<'v>(
    input: &[u8],
    open: &[u8],
    literal: &BTreeSet<Vec<u8>>,
    value_of: impl Fn(&str) -> Result<&'v SecretString, PolicyError>,
) -> Result<Vec<u8>, PolicyError> {
    let mut out = Vec::with_capacity(input.len());
    let mut rest = input;
    let mut substituted = 0;
    while let Some(start) = find(rest, open) {
        let after_open = &rest[start + open.len()..];
        let Some(end) = placeholder_name_len(after_open) else {
            out.extend_from_slice(&rest[..start + open.len()]);
            rest = after_open;
            continue;
        };
        let name = &after_open[..end];
        let close = start + open.len() + end + PLACEHOLDER_CLOSE.len();
        if literal.contains(&rest[start..close]) {
            out.extend_from_slice(&rest[..close]);
            rest = &rest[close..];
            continue;
        }
        substituted += 1;
        if substituted > MAX_PLACEHOLDERS {
            return Err(PolicyError::Invalid(format!(
                "more than {MAX_PLACEHOLDERS} placeholders in one header or body"
            )));
        }
        // Checked above: ASCII only.
        let value = value_of(&String::from_utf8_lossy(name))?;
        out.extend_from_slice(&rest[..start]);
        out.extend_from_slice(value.expose_secret().as_bytes());
        rest = &after_open[end + PLACEHOLDER_CLOSE.len()..];
    }
    out.extend_from_slice(rest);
    Ok(out)
}

/// Whether `name` may appear in a placeholder: `[a-z0-9_]+`.
pub(crate) fn is_placeholder_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(is_name_byte)
}

fn is_name_byte(c: &u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_'
}

/// The length of the placeholder name `after_open` starts with, when `}}`
/// closes it right after. Read from the front only, so a scan stays
/// linear: looking for each opening's `}}` to the end was quadratic, and a
/// webhook body of 30,000 `{{secret:`, signed or not, held a worker thread
/// for seconds before its signature was checked.
fn placeholder_name_len(after_open: &[u8]) -> Option<usize> {
    let len = after_open
        .iter()
        .take(MAX_PLACEHOLDER_NAME + 1)
        .take_while(|c| is_name_byte(c))
        .count();
    (len > 0 && len <= MAX_PLACEHOLDER_NAME && after_open[len..].starts_with(PLACEHOLDER_CLOSE))
        .then_some(len)
}

/// The longest name a placeholder can hold: that of a secret a manifest
/// declares, or of a token a call obtains. Longer runs are plain text:
/// kept whole, a remote's answers of megabytes each grew the call's set
/// of data placeholders to gigabytes on the host.
const MAX_PLACEHOLDER_NAME: usize = 64;

/// Whether `input` holds anything that looks like a secret placeholder.
pub(crate) fn has_placeholder(input: &[u8]) -> bool {
    find(input, SECRET_OPEN).is_some()
}

/// Whether `input` holds anything that looks like a token placeholder.
pub(crate) fn has_token_placeholder(input: &[u8]) -> bool {
    find(input, TOKEN_OPEN).is_some()
}

/// Secrets shorter than this are not redacted from responses: a short value
/// would match unrelated text, and a short secret offers no protection anyway.
const MIN_REDACTED_LEN: usize = 6;

/// Replaces every configured secret value in `data` with its placeholder, so a
/// remote that echoes a credential back does not hand it to the connector.
pub(crate) fn redact_secrets(data: &mut Vec<u8>, values: &BTreeMap<String, SecretString>) {
    Redactor::default().secrets(values).redact(data);
}

/// Every encoded form ([`encoded_forms`]) of a set of secret and token
/// values, each with its placeholder, searched for at once: a response is
/// read once for the secrets and once for the tokens, whatever the number
/// of values. Searched for value by value and form by form, and the forms
/// made again for each response and each of its headers, a 4 MiB answer
/// with a hundred headers against eight secrets took ten times as long,
/// work no deadline interrupts, for every request a guest sent.
#[derive(Default)]
pub struct Redactor {
    secrets: Forms,
    tokens: Forms,
}

impl Redactor {
    /// Adds secret values, redacted as `{{secret:NAME}}`.
    pub fn secrets(mut self, values: &BTreeMap<String, SecretString>) -> Self {
        self.secrets.add(values, "secret");
        self
    }

    /// Adds token values, redacted as `{{token:NAME}}` (one name may come
    /// with several values: those a connector obtained under it).
    pub fn tokens<'a>(
        mut self,
        values: impl IntoIterator<Item = (&'a String, &'a SecretString)>,
    ) -> Self {
        self.tokens.add(values, "token");
        self
    }

    /// Replaces every form in `data` with its value's placeholder: the
    /// secrets first, then the tokens (a token of the remote's choosing
    /// that overlaps the start of an echoed secret, replaced first, left
    /// the rest of the secret in clear); within each, at each place the
    /// longest form that starts there, left to right.
    pub fn redact(&self, data: &mut Vec<u8>) {
        self.secrets.redact(data);
        self.tokens.redact(data);
    }
}

/// One kind's forms and placeholders, and their automaton, made on first
/// use.
#[derive(Default)]
struct Forms {
    forms: Vec<Vec<u8>>,
    placeholders: Vec<Vec<u8>>,
    automaton: std::sync::OnceLock<Option<aho_corasick::AhoCorasick>>,
}

impl Forms {
    fn add<'a>(
        &mut self,
        values: impl IntoIterator<Item = (&'a String, &'a SecretString)>,
        kind: &str,
    ) {
        for (name, value) in values {
            let value = value.expose_secret().as_bytes();
            if value.len() < MIN_REDACTED_LEN {
                continue;
            }
            let placeholder = format!("{{{{{kind}:{name}}}}}").into_bytes();
            for form in encoded_forms(value) {
                self.forms.push(form);
                self.placeholders.push(placeholder.clone());
            }
        }
        self.automaton = std::sync::OnceLock::new();
    }

    fn redact(&self, data: &mut Vec<u8>) {
        if self.forms.is_empty() {
            return;
        }
        let automaton = self.automaton.get_or_init(|| {
            aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&self.forms)
                .ok()
        });
        let Some(automaton) = automaton else {
            // Never with forms this short (an automaton too big to build):
            // one form at a time.
            for (form, placeholder) in self.forms.iter().zip(&self.placeholders) {
                replace_all(data, form, placeholder);
            }
            return;
        };
        let mut found = automaton.find_iter(data.as_slice()).peekable();
        if found.peek().is_none() {
            return;
        }
        let mut out = Vec::with_capacity(data.len());
        let mut from = 0;
        for found in found {
            out.extend_from_slice(&data[from..found.start()]);
            out.extend_from_slice(&self.placeholders[found.pattern().as_usize()]);
            from = found.end();
        }
        out.extend_from_slice(&data[from..]);
        *data = out;
    }
}

/// Shortest encoded fragment redacted: shorter ones would match unrelated
/// text.
const MIN_FRAGMENT_LEN: usize = 8;

/// How a secret may come back from a remote: as is, percent-encoded
/// (upper- or lower-case hex, `+` for spaces as forms do), as a JSON
/// string escapes it (`\"`, `\\`, and `\/` as PHP's encoder writes a
/// slash: an OAuth error body echoing the client secret so reached the
/// connector, its errors and the logs; `\u00e4` for what is not ASCII, as
/// Python's does, `\u0026` for `&`, as Go's, and `\u002B` for `+` and `'`
/// and `` ` `` too, and `\u0022` for `"`, as .NET's `System.Text.Json`), and in base64
/// (standard or URL-safe), where it may sit at any byte offset of a longer
/// encoded text such as `user:secret` in a Basic credential. For base64 the
/// fragment that does not depend on the neighbouring bytes is matched, for
/// each of the three alignments.
pub fn encoded_forms(value: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let mut forms = vec![value.to_vec()];
    for upper in [true, false] {
        let encoded = percent_encode(value, upper);
        if encoded != value {
            forms.push(encoded);
        }
    }
    let form: Vec<u8> = url::form_urlencoded::byte_serialize(value)
        .collect::<String>()
        .into_bytes();
    forms.push(form);
    if let Ok(text) = std::str::from_utf8(value) {
        let json = serde_json::Value::from(text).to_string();
        let json = json[1..json.len() - 1].to_owned();
        forms.push(json.replace('/', "\\/").into_bytes());
        // What is not ASCII as `\uXXXX` (Python's default), `&`, `<`, `>`
        // so (Go's), or both; or those and `+`, `'`, `` ` `` (.NET's); in
        // either case of hex.
        const GO: &[char] = &['&', '<', '>'];
        const DOTNET: &[char] = &['&', '<', '>', '+', '\'', '`'];
        for (non_ascii, ascii, upper) in [
            (true, &[][..], false),
            (false, GO, false),
            (true, GO, false),
            (false, DOTNET, false),
            (true, DOTNET, false),
            (true, &[][..], true),
            (false, GO, true),
            (true, GO, true),
            (false, DOTNET, true),
            (true, DOTNET, true),
        ] {
            // .NET's encoder writes a `"` as `\u0022`, not `\"` (the one
            // JSON escape made of a backslash and a quote).
            let source = if ascii == DOTNET {
                json.replace("\\\"", "\\u0022")
            } else {
                json.clone()
            };
            let mut escaped = String::with_capacity(json.len());
            for c in source.chars() {
                let escape = if c.is_ascii() {
                    ascii.contains(&c)
                } else {
                    non_ascii
                };
                if !escape {
                    escaped.push(c);
                    continue;
                }
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    if upper {
                        escaped.push_str(&format!("\\u{unit:04X}"));
                    } else {
                        escaped.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
            if escaped != json && !forms.iter().any(|f| f == escaped.as_bytes()) {
                forms.push(escaped.into_bytes());
            }
        }
        forms.push(json.into_bytes());
    }
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE,
    ] {
        for offset in 0..3 {
            let mut input = vec![0u8; offset];
            input.extend_from_slice(value);
            let encoded = engine.encode(&input).into_bytes();
            // Characters from a block holding filler or following bytes
            // depend on them: keep the blocks made of the value alone.
            let start = if offset == 0 { 0 } else { 4 };
            let end = 4 * (input.len() / 3);
            if end > start && end - start >= MIN_FRAGMENT_LEN {
                forms.push(encoded[start..end].to_vec());
            }
        }
    }
    forms.sort();
    forms.dedup();
    // Longest first, so a form is replaced before a shorter one inside it.
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms
}

fn percent_encode(value: &[u8], upper: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b);
        } else if upper {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.extend_from_slice(format!("%{b:02x}").as_bytes());
        }
    }
    out
}

fn replace_all(data: &mut Vec<u8>, needle: &[u8], with: &[u8]) {
    if needle.is_empty() {
        return;
    }
    let finder = memchr::memmem::Finder::new(needle);
    let mut found = finder.find_iter(data).peekable();
    if found.peek().is_none() {
        return;
    }
    let mut out = Vec::with_capacity(data.len());
    let mut from = 0;
    for at in found {
        out.extend_from_slice(&data[from..at]);
        out.extend_from_slice(with);
        from = at + needle.len();
    }
    out.extend_from_slice(&data[from..]);
    *data = out;
}

/// Where `needle` first occurs in `haystack`, in linear time: a response
/// is searched for every encoded form of every secret, and a naive search
/// of a body made of a form's first bytes blocked the host's thread for
/// each (a connector's hostile remote, or the connector itself).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    memchr::memmem::find(haystack, needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules<'a>(
        declared: &'a [DeclaredHost],
        allowed: &'a [String],
        private: bool,
    ) -> HostRules<'a> {
        HostRules {
            declared,
            operator: OperatorHosts {
                allowed,
                denied: &[],
                allow_private: private,
            },
        }
    }

    fn declared(entries: &[&str]) -> Vec<DeclaredHost> {
        entries
            .iter()
            .map(|e| DeclaredHost::from_manifest_entry(e).unwrap())
            .collect()
    }

    #[test]
    fn declared_host_is_allowed_and_others_are_denied() {
        let d = declared(&["api.example.com"]);
        assert!(check_url("https://api.example.com/v1/x", &rules(&d, &[], false)).is_ok());
        assert!(check_url("https://API.Example.com./v1", &rules(&d, &[], false)).is_ok());
        let denied = check_url("https://evil.example.net/", &rules(&d, &[], false));
        assert!(matches!(denied, Err(PolicyError::Denied(_))), "{denied:?}");
        // A subdomain or another port is another host.
        assert!(check_url("https://x.api.example.com/", &rules(&d, &[], false)).is_err());
        assert!(check_url("https://api.example.com:8443/", &rules(&d, &[], false)).is_err());
    }

    #[test]
    fn a_dot_segment_in_the_path_is_refused() {
        let d = declared(&["api.example.com"]);
        for url in [
            "https://api.example.com/v1/contacts/..",
            "https://api.example.com/v1/contacts/%2E%2E?x=1",
            "https://api.example.com/v1/contacts/.%2e/",
            "https://api.example.com/v1/contacts/%2e",
            "https://api.example.com/v1\\..\\x",
            "https://api.example.com/v1/contacts/.\t.",
            "https://api.example.com/v1/contacts/%2\ne",
            "https://api.example.com/v1/contacts/.\r",
            // The parser drops the spaces at either end.
            "https://api.example.com/v1/contacts/.. ",
            " https://api.example.com/v1/contacts/%2e%2e  ",
        ] {
            let refused = check_url(url, &rules(&d, &[], false));
            assert!(
                matches!(refused, Err(PolicyError::Invalid(_))),
                "{url}: {refused:?}"
            );
        }
        for url in [
            "https://api.example.com/v1/contacts/...",
            "https://api.example.com/v1/contacts/a.b?next=../x",
            "https://api.example.com/v1/contacts/..%2Fx",
            "https://api.example.com",
            "https://api.example.com?next=/../x",
        ] {
            assert!(check_url(url, &rules(&d, &[], false)).is_ok(), "{url}");
        }
    }

    #[test]
    fn http_scheme_needs_private_hosts_allowed() {
        let d = declared(&["api.example.com"]);
        assert!(matches!(
            check_url("http://api.example.com/", &rules(&d, &[], false)),
            Err(PolicyError::Denied(_))
        ));
        // With the operator's permission the declared host is reachable over http.
        assert!(check_url("http://api.example.com/", &rules(&d, &[], true)).is_ok());
        assert!(matches!(
            check_url("ftp://api.example.com/", &rules(&d, &[], true)),
            Err(PolicyError::Invalid(_))
        ));
    }

    #[test]
    fn private_addresses_are_refused_even_when_declared() {
        let d = vec![
            DeclaredHost::from_setting_url("http://127.0.0.1:4000").unwrap(),
            DeclaredHost::from_setting_url("https://169.254.169.254").unwrap(),
            DeclaredHost::from_setting_url("https://[::1]:9000").unwrap(),
            DeclaredHost::from_setting_url("https://localhost:9000").unwrap(),
        ];
        for url in [
            "https://127.0.0.1:4000/",
            "https://169.254.169.254/latest",
            "https://[::1]:9000/",
            "https://localhost:9000/",
        ] {
            let r = check_url(url, &rules(&d, &[], false));
            assert!(matches!(r, Err(PolicyError::Denied(_))), "{url}: {r:?}");
        }
        assert!(check_url("http://127.0.0.1:4000/v1", &rules(&d, &[], true)).is_ok());
        // The setting's port is part of the declaration.
        assert!(check_url("http://127.0.0.1:5432/", &rules(&d, &[], true)).is_err());
    }

    #[test]
    fn operator_allow_list_narrows_declared_hosts() {
        let d = declared(&["api.example.com", "files.example.com"]);
        let allowed = vec!["*.example.com".to_owned()];
        assert!(check_url("https://files.example.com/", &rules(&d, &allowed, false)).is_ok());
        let allowed = vec!["api.example.com".to_owned()];
        assert!(check_url("https://files.example.com/", &rules(&d, &allowed, false)).is_err());
    }

    /// Operator entries are read as hosts are written: an IDN entry or a
    /// bracketed IPv6 one matched nothing, and denied nothing.
    #[test]
    fn list_entries_are_written_as_hosts_are() {
        assert!(list_matches("Bücher.Example.", "xn--bcher-kva.example"));
        assert!(list_matches(
            "*.bücher.example",
            "api.xn--bcher-kva.example"
        ));
        assert!(list_matches("[2606:4700::1111]", "2606:4700::1111"));
        assert!(list_matches("[2606:4700:0::1111]", "2606:4700::1111"));
        // Bare, in any spelling.
        assert!(list_matches("2606:4700:0:0::1111", "2606:4700::1111"));
        assert!(list_matches("2606:4700::1111", "2606:4700::1111"));
        assert!(list_matches("10.0.0.1", "10.0.0.1"));
        assert!(list_matches(" API.example.com ", "api.example.com"));
        assert!(!list_matches("*.example.com", "example.com"));
    }

    /// An IPv6 form of a denied IPv4 address reaches it as well: it matched
    /// no entry written as the IPv4 address, and went out.
    #[test]
    fn an_ipv6_form_of_a_denied_address_is_denied() {
        let denied = ["93.184.216.34".to_owned()];
        let operator = OperatorHosts {
            allowed: &[],
            denied: &denied,
            allow_private: true,
        };
        for url in [
            "https://93.184.216.34/",
            "https://[::ffff:93.184.216.34]/",
            "https://[::ffff:5db8:d822]/",
            "https://[64:ff9b::93.184.216.34]/",
            "https://[::93.184.216.34]/",
            "https://[::ffff:0:93.184.216.34]/",
            "https://[2002:5db8:d822::1]/",
        ] {
            let d = declared(&[url.trim_start_matches("https://").trim_end_matches('/')]);
            let rules = HostRules {
                declared: &d,
                operator,
            };
            let refused = check_url(url, &rules);
            assert!(
                matches!(&refused, Err(PolicyError::Denied(why)) if why.contains("deny-list")),
                "{url}: {refused:?}"
            );
        }
        let d = declared(&["[::ffff:93.184.216.35]"]);
        let rules = HostRules {
            declared: &d,
            operator,
        };
        assert!(check_url("https://[::ffff:93.184.216.35]/", &rules).is_ok());
        // An entry written in one of those forms denies the address too.
        let denied = ["[64:ff9b::5db8:d822]".to_owned()];
        let operator = OperatorHosts {
            allowed: &[],
            denied: &denied,
            allow_private: true,
        };
        let d = declared(&["93.184.216.34"]);
        let rules = HostRules {
            declared: &d,
            operator,
        };
        assert!(matches!(
            check_url("https://93.184.216.34/", &rules),
            Err(PolicyError::Denied(_))
        ));
    }

    #[test]
    fn forbidden_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "ff02::1",
            // IPv4-translated, 6to4 and local-use NAT64 forms of private
            // and metadata addresses.
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101::1",
            "64:ff9b:1::5db8:d822",
            "64:ff9b:1:abcd::1",
        ] {
            assert!(is_forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            // The same forms around public addresses stay reachable.
            "::ffff:0:5db8:d822",
            "2002:5db8:d822::1",
            "64:ff9b::5db8:d822",
        ] {
            assert!(!is_forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
    }

    fn secrets() -> BTreeMap<String, SecretString> {
        BTreeMap::from([("api_key".to_owned(), SecretString::from("sk_test_123456"))])
    }

    #[test]
    fn substitutes_declared_secrets_only() {
        let declared = vec!["api_key".to_owned()];
        let out = substitute_secrets(
            b"Bearer {{secret:api_key}}!",
            &declared,
            &secrets(),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(out, b"Bearer sk_test_123456!");
        let undeclared =
            substitute_secrets(b"{{secret:other}}", &declared, &secrets(), &BTreeSet::new());
        assert!(matches!(undeclared, Err(PolicyError::Denied(_))));
        let unset = substitute_secrets(
            b"{{secret:api_key}}",
            &declared,
            &BTreeMap::new(),
            &BTreeSet::new(),
        );
        assert!(matches!(unset, Err(PolicyError::Denied(_))));
        // Not a placeholder: left alone.
        let out = substitute_secrets(
            b"{{secret:Bad Name}} {{secret:",
            &declared,
            &secrets(),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(out, b"{{secret:Bad Name}} {{secret:");
    }

    /// A placeholder the call's data holds (a customer named after one)
    /// goes out as written; the connector's own, of another name, is
    /// replaced.
    #[test]
    fn placeholders_the_data_holds_stay_text() {
        let declared = vec!["api_key".to_owned(), "other".to_owned()];
        let data = br#"{"name":"{{secret:api_key}}","x":"{{secret:Bad}} {{token:t}} {{secret:"}"#;
        let literal: BTreeSet<Vec<u8>> = placeholders_in(data).into_iter().collect();
        assert_eq!(
            literal,
            BTreeSet::from([b"{{secret:api_key}}".to_vec(), b"{{token:t}}".to_vec()])
        );
        let body = br#"{"name":"{{secret:api_key}}","key":"{{secret:other}}"}"#;
        let values = BTreeMap::from([
            ("api_key".to_owned(), SecretString::from("sk_test_123456")),
            ("other".to_owned(), SecretString::from("other_value")),
        ]);
        let out = substitute_secrets(body, &declared, &values, &literal).unwrap();
        assert_eq!(out, br#"{"name":"{{secret:api_key}}","key":"other_value"}"#);
    }

    /// A remote answering with more distinct placeholders than are kept:
    /// the set stops growing, and no body of the call is substituted.
    /// A list entry that is no host is refused (it matched nothing); a
    /// host, a `*.suffix`, an address (bare IPv6 too) are taken.
    #[test]
    fn list_entries_that_are_no_host_are_refused() {
        for taken in [
            "api.stripe.com",
            "*.salesforce.com",
            "API.Example.com.",
            "10.1.2.3",
            "2606:4700::1111",
            "[2606:4700::1111]",
            "bücher.example",
        ] {
            assert_eq!(list_entry_problem(taken), None, "{taken}");
        }
        for refused in [
            "10.0.0.0/8",
            "api.example.com:443",
            "https://api.example.com",
            "*.",
            "*",
            "api.*.example.com",
        ] {
            assert!(list_entry_problem(refused).is_some(), "{refused}");
        }
    }

    #[test]
    fn data_placeholders_are_bounded() {
        let mut data = DataPlaceholders::default();
        data.note(b"{{secret:a}} {{token:b}}");
        assert_eq!(data.literal().map(BTreeSet::len), Some(2));
        let flood: String = (0..2 * MAX_DATA_PLACEHOLDERS)
            .map(|n| format!("{{{{secret:k{n}}}}}"))
            .collect();
        data.note(flood.as_bytes());
        assert!(data.literal().is_none());
        assert_eq!(data.seen.len(), MAX_DATA_PLACEHOLDERS);
    }

    /// A body of placeholders grew on the host into copies of the secret,
    /// outside the guest's memory cap: a bounded number is substituted.
    #[test]
    fn a_request_holds_a_bounded_number_of_placeholders() {
        let declared = vec!["api_key".to_owned()];
        let many = "{{secret:api_key}}".repeat(MAX_PLACEHOLDERS);
        assert!(
            substitute_secrets(many.as_bytes(), &declared, &secrets(), &BTreeSet::new()).is_ok()
        );
        let more = "{{secret:api_key}}".repeat(100_000);
        assert!(matches!(
            substitute_secrets(more.as_bytes(), &declared, &secrets(), &BTreeSet::new()),
            Err(PolicyError::Invalid(_))
        ));
    }

    /// Openings that no name closes are read once each: a body of them
    /// (a webhook's, before its signature is checked) was scanned to its
    /// end from every opening, quadratic in its size (1 MiB of them: ~60
    /// billion byte reads). An opening inside another's name still counts.
    #[test]
    fn unclosed_openings_are_read_once() {
        let declared = vec!["api_key".to_owned()];
        let mut flood = "{{secret:".repeat(120_000);
        flood.push_str("{{token:t}} {{secret:{{secret:api_key}}");
        let found = placeholders_in(flood.as_bytes());
        assert_eq!(
            found,
            vec![b"{{secret:api_key}}".to_vec(), b"{{token:t}}".to_vec()]
        );
        let out =
            substitute_secrets(flood.as_bytes(), &declared, &secrets(), &BTreeSet::new()).unwrap();
        assert!(out.ends_with(b"{{token:t}} {{secret:sk_test_123456"));
        assert_eq!(out.len(), flood.len() - "{{secret:api_key}}".len() + 14);
    }

    /// A name longer than any a secret or token can have is no
    /// placeholder: kept whole, megabytes of it were held for the call.
    #[test]
    fn names_longer_than_a_declared_one_are_no_placeholders() {
        let longest = format!("{{{{secret:{}}}}}", "a".repeat(64));
        assert_eq!(
            placeholders_in(longest.as_bytes()),
            vec![longest.clone().into_bytes()]
        );
        let longer = format!(
            "{{{{secret:{}}}}} {{{{token:{}}}}}",
            "a".repeat(65),
            "b".repeat(100_000)
        );
        assert!(placeholders_in(longer.as_bytes()).is_empty());
        let declared = vec!["api_key".to_owned()];
        let out =
            substitute_secrets(longer.as_bytes(), &declared, &secrets(), &BTreeSet::new()).unwrap();
        assert_eq!(out, longer.as_bytes(), "sent as written");
    }

    #[test]
    fn substitutes_tokens_obtained_in_the_call_only() {
        let tokens = BTreeMap::from([("api".to_owned(), SecretString::from("00Dtoken!abc"))]);
        let out = substitute_tokens(b"Bearer {{token:api}}", &tokens).unwrap();
        assert_eq!(out, b"Bearer 00Dtoken!abc");
        let missing = substitute_tokens(b"Bearer {{token:other}}", &tokens);
        assert!(matches!(missing, Err(PolicyError::Denied(_))));
        // A secret placeholder is not a token placeholder.
        let out = substitute_tokens(b"{{secret:api}}", &tokens).unwrap();
        assert_eq!(out, b"{{secret:api}}");
        let mut body = b"your token is 00Dtoken!abc".to_vec();
        Redactor::default().tokens(&tokens).redact(&mut body);
        assert_eq!(body, b"your token is {{token:api}}");
    }

    /// One redactor holds every value's forms: each is replaced by its own
    /// placeholder, a value inside a longer one's echo loses to the longer,
    /// and a body of a form's first bytes over and over is read once.
    #[test]
    fn one_redactor_replaces_every_value_with_its_own_placeholder() {
        let secrets = BTreeMap::from([
            ("api_key".to_owned(), SecretString::from("sk_test_123456")),
            ("short".to_owned(), SecretString::from("abc")),
        ]);
        let tokens = BTreeMap::from([
            // Holds the other: the longer value is the one echoed.
            ("api".to_owned(), SecretString::from("Bearer-tok_123456-x")),
            ("inner".to_owned(), SecretString::from("tok_123456")),
        ]);
        let redactor = Redactor::default().secrets(&secrets).tokens(&tokens);
        let mut body =
            b"a=sk_test_123456&b=Bearer-tok_123456-x&c=sk_test_123456%21&d=abc&e=tok_123456"
                .to_vec();
        redactor.redact(&mut body);
        assert_eq!(
            body,
            b"a={{secret:api_key}}&b={{token:api}}&c={{secret:api_key}}%21&d=abc&e={{token:inner}}"
        );
        // The same redactor, again: the automaton is kept.
        let mut quoted = br#"{"echo":"sk_test_123456"}"#.to_vec();
        redactor.redact(&mut quoted);
        assert_eq!(quoted, br#"{"echo":"{{secret:api_key}}"}"#);
        let mut near_misses = b"sk_test_12345".repeat(100_000);
        let before = near_misses.clone();
        redactor.redact(&mut near_misses);
        assert_eq!(near_misses, before);
        let mut nothing = b"sk_test_123456".to_vec();
        Redactor::default().redact(&mut nothing);
        assert_eq!(nothing, b"sk_test_123456");
        // A token of the remote's choosing that overlaps the start of an
        // echoed secret does not leave the rest of the secret in clear.
        let overlapping = BTreeMap::from([("t".to_owned(), SecretString::from("QQQQQs"))]);
        let redactor = Redactor::default().secrets(&secrets).tokens(&overlapping);
        let mut echo = b"QQQQQsk_test_123456".to_vec();
        redactor.redact(&mut echo);
        assert_eq!(echo, b"QQQQQ{{secret:api_key}}");
    }

    #[test]
    fn redacts_echoed_secrets() {
        let mut body = b"you sent sk_test_123456 and sk_test_123456".to_vec();
        redact_secrets(&mut body, &secrets());
        assert_eq!(body, b"you sent {{secret:api_key}} and {{secret:api_key}}");
    }

    #[test]
    fn redacts_encoded_echoes_of_a_secret() {
        use base64::Engine as _;
        let secret = "sk_live_51H+abc/DEF=ghi \"42\"";
        let values = BTreeMap::from([("api_key".to_owned(), SecretString::from(secret))]);
        let b64 = &base64::engine::general_purpose::STANDARD;
        let url_safe = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let echoes = [
            format!("Bearer {}", b64.encode(secret)),
            // A Basic credential: the secret at offsets 0, 1 and 2 of a block.
            format!("Basic {}", b64.encode(format!("{secret}:"))),
            format!("Basic {}", b64.encode(format!("u:{secret}"))),
            format!("Basic {}", b64.encode(format!("us:{secret}"))),
            format!("token={}", url_safe.encode(format!("x{secret}"))),
            "key=sk_live_51H%2Babc%2FDEF%3Dghi%20%2242%22".to_owned(),
            "key=sk_live_51H%2babc%2fDEF%3dghi%20%2242%22".to_owned(),
            "key=sk_live_51H%2Babc%2FDEF%3Dghi+%2242%22".to_owned(),
            r#"{"error_description":"bad client sk_live_51H+abc\/DEF=ghi \"42\""}"#.to_owned(),
            r#"{"error_description":"bad client sk_live_51H+abc/DEF=ghi \"42\""}"#.to_owned(),
        ];
        for echo in echoes {
            let mut body = echo.clone().into_bytes();
            redact_secrets(&mut body, &values);
            let text = String::from_utf8(body).unwrap();
            assert!(text.contains("{{secret:api_key}}"), "{echo} -> {text}");
            // What is left of the secret is at most the two characters next
            // to a base64 fragment's edge.
            assert!(!text.contains("abc"), "{echo} -> {text}");
        }
        // Escaped as Python (what is not ASCII) and Go (`&<>`) write JSON,
        // and as an encoder escaping both.
        let secret = "p\u{e4}ss&w\u{f6}rd<42>";
        let values = BTreeMap::from([("api_key".to_owned(), SecretString::from(secret))]);
        for echo in [
            r#"{"error_description":"bad p\u00e4ss&w\u00f6rd<42>"}"#,
            "{\"error_description\":\"bad p\u{e4}ss\\u0026w\u{f6}rd\\u003c42\\u003e\"}",
            r#"{"error_description":"bad p\u00e4ss\u0026w\u00f6rd\u003c42\u003e"}"#,
            r#"{"error_description":"bad p\u00E4ss\u0026w\u00F6rd\u003C42\u003E"}"#,
        ] {
            let mut body = echo.as_bytes().to_vec();
            redact_secrets(&mut body, &values);
            let text = String::from_utf8(body).unwrap();
            assert!(text.contains("{{secret:api_key}}"), "{echo} -> {text}");
        }
        // As .NET's encoder writes it: `+`, `'` and `"` escaped too.
        let secret = "ab+cd'ef&gh\"ij\\\"k";
        let values = BTreeMap::from([("api_key".to_owned(), SecretString::from(secret))]);
        for echo in [
            r#"{"access_token":"ab\u002Bcd\u0027ef\u0026gh\u0022ij\\\u0022k"}"#,
            r#"{"access_token":"ab\u002bcd\u0027ef\u0026gh\u0022ij\\\u0022k"}"#,
        ] {
            let mut body = echo.as_bytes().to_vec();
            redact_secrets(&mut body, &values);
            let text = String::from_utf8(body).unwrap();
            assert!(text.contains("{{secret:api_key}}"), "{echo} -> {text}");
        }
    }

    #[test]
    fn manifest_entries_parse() {
        assert_eq!(
            DeclaredHost::from_manifest_entry("api.stripe.com").unwrap(),
            DeclaredHost {
                host: "api.stripe.com".into(),
                port: None
            }
        );
        assert_eq!(
            DeclaredHost::from_manifest_entry("Api.X.com:8443")
                .unwrap()
                .port,
            Some(8443)
        );
        for bad in [
            "https://api.stripe.com",
            "api.stripe.com/v1",
            "*.stripe.com",
            "",
            "a b",
            // Read by the URL parser as another host than shown.
            "evil.com\\.api.stripe.com",
            "api.stripe.com%2Eevil.com",
            "api.stripe.com\t.evil.com",
            "api.stripe.com\n.evil.com",
        ] {
            assert!(DeclaredHost::from_manifest_entry(bad).is_err(), "{bad}");
        }
    }
}
