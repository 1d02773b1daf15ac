//! Three-way merge of a customer record: the last synced snapshot (base),
//! the local record and a remote one, field by field (DESIGN.md section 3,
//! "Conflicts"). Pure: no I/O, no clock; the caller stores the result and
//! records the conflicts.
//!
//! # Granularity
//!
//! The unit of change is one *field*: `name`, `email`, `phone`, each
//! `address` subfield on its own (`address.city`) and each metadata key on
//! its own (`metadata.tier`). A person who fixes the city in Stripe while
//! another changes the street line locally made two unrelated edits, and
//! metadata keys are usually owned by different integrations; treating the
//! address or the metadata as one value would turn those into conflicts. A
//! metadata key may itself contain dots: the field name is `metadata.` plus
//! the key as is. The canonical `id` is not a field: it names the record on
//! each side and differs by design.
//!
//! # Equality
//!
//! Values are compared trimmed. Absent, `null`, `""` and a value that is not
//! a string all mean "not set" (docs/connector-contract.md: every field is
//! optional), so a remote that writes `""` where ferry has `null` did not
//! change anything. Emails compare case-insensitively, as ferry stores them.
//!
//! # Rules
//!
//! With a base, a side *changed* a field when its value differs from the
//! base's. Changed on one side only: that side's value is taken. Changed on
//! both to the same value: nothing to decide. Changed on both to different
//! values: a [`FieldConflict`], resolved by the [`ConflictPolicy`]; flagged
//! conflicts keep the local value in the merged record until a person decides.
//!
//! With no base (never synced, e.g. a remote record just matched to a local
//! customer by email) nothing says who changed what, so a field whose values
//! differ counts as changed remotely: the remote's value is taken, and under
//! [`ConflictPolicy::Flag`] and [`ConflictPolicy::PreferLocal`] it is a
//! conflict instead (a person decides; ferry's value stands, as a
//! reconciliation's `push_local` asks). One refinement: without
//! a base, a field the remote does not set is taken as *not known* there
//! rather than as *cleared* (a connector whose system has no phone numbers
//! never writes `phone`), so the local value is kept and nothing conflicts;
//! likewise a field only the remote sets fills the local gap without a
//! conflict, even under `Flag`. Only two set, different values conflict.
//! Once a snapshot exists, an unset field that was set in it is a deletion,
//! unless the snapshot is *assumed* ([`ASSUMED_BASE`]): what ferry pushed to
//! a connector that returned no record, which may hold fields the remote
//! does not keep. There a field the remote leaves unset is not known, as
//! without a base; the fields it sets are compared with what was pushed.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::api::customers::normalise_email;

/// Marks a snapshot that is what ferry pushed, not what the remote said it
/// holds (its push result carried no record): `"ferry:assumed": true`.
pub const ASSUMED_BASE: &str = "ferry:assumed";

/// The address subfields, in canonical order (Stripe's names).
const ADDRESS_FIELDS: [&str; 6] = ["line1", "line2", "city", "state", "postal_code", "country"];

/// The top-level string fields.
const SCALAR_FIELDS: [&str; 3] = ["name", "email", "phone"];

/// How a field changed differently on both sides is decided.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The side whose change is newer; a tie goes to the remote.
    LastWriterWins,
    /// Always the local value.
    PreferLocal,
    /// Always the remote value.
    PreferRemote,
    /// Neither: the local value stays and a person decides.
    Flag,
}

/// Which value a conflict ended with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// The local value was kept.
    Local,
    /// The remote value was taken.
    Remote,
    /// Flagged: the local value stays until a person resolves it.
    Pending,
}

/// One field changed differently on both sides.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct FieldConflict {
    /// Dotted field name: `name`, `address.city`, `metadata.tier`.
    pub field: String,
    /// The snapshot's value (trimmed string, or null when not set or when
    /// there is no snapshot).
    #[schema(value_type = Object)]
    pub base: Value,
    /// The local value (trimmed string or null).
    #[schema(value_type = Object)]
    pub local: Value,
    /// The remote value (trimmed string or null).
    #[schema(value_type = Object)]
    pub remote: Value,
    /// How the policy decided it.
    pub resolution: Resolution,
}

/// The three records to merge, canonical customer JSON each.
#[derive(Debug, Clone, Copy)]
pub struct Sides<'a> {
    /// The last synced snapshot for this (customer, connector); `None` when
    /// the two were never synced.
    pub base: Option<&'a Value>,
    /// The local record.
    pub local: &'a Value,
    /// The remote record.
    pub remote: &'a Value,
    /// When the local record was last written, unix ms.
    pub local_changed_at_ms: i64,
    /// When the remote record was last written, unix ms, as precisely as the
    /// remote says (Stripe: whole seconds).
    pub remote_changed_at_ms: i64,
}

/// Which system owns which fields (configuration `field_owners`): the
/// owner's value wins. Keys are field names as [`merge`] uses them (`phone`,
/// `address.city`, `metadata.tier`) or a whole group (`address`,
/// `metadata`); values are a connector's name, or `ferry` for the catalog
/// itself (then no remote's edit to the field is taken).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct FieldOwners(BTreeMap<String, String>);

/// Read flat (`"address.city" = "stripe"`) or nested: the environment's
/// `FERRY_FIELD_OWNERS__ADDRESS__CITY` and a TOML file's unquoted dotted
/// key both arrive as `{address: {city: …}}`, which a flat map refused,
/// so no owner of a single address line or metadata key could be set
/// from the environment.
impl<'de> serde::Deserialize<'de> for FieldOwners {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Owner {
            One(String),
            Group(BTreeMap<String, Owner>),
        }
        fn flatten(
            prefix: &str,
            owners: BTreeMap<String, Owner>,
            into: &mut BTreeMap<String, String>,
        ) {
            for (key, owner) in owners {
                let field = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                match owner {
                    Owner::One(name) => {
                        into.insert(field, name);
                    }
                    Owner::Group(inner) => flatten(&field, inner, into),
                }
            }
        }
        let nested = BTreeMap::<String, Owner>::deserialize(deserializer)?;
        let mut flat = BTreeMap::new();
        flatten("", nested, &mut flat);
        Ok(Self(flat))
    }
}

/// The owner name of fields only ferry's own API may change.
pub const LOCAL_OWNER: &str = "ferry";

impl FieldOwners {
    /// The owners given, as they are.
    pub fn new(owners: BTreeMap<String, String>) -> Self {
        Self(owners)
    }

    /// Whether no field has an owner.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The owner of `field`: its own entry, else its group's.
    pub fn owner(&self, field: &str) -> Option<&str> {
        self.0
            .get(field)
            .or_else(|| {
                let group = field.split_once('.').map(|(group, _)| group)?;
                self.0.get(group)
            })
            .map(String::as_str)
    }

    /// Names a key that is not a field (for configuration checks).
    pub fn invalid_key(&self) -> Option<&str> {
        self.0
            .keys()
            .find(|key| {
                let key = key.as_str();
                let known = SCALAR_FIELDS.contains(&key)
                    || key == "address"
                    || key == "metadata"
                    || key
                        .strip_prefix("address.")
                        .is_some_and(|sub| ADDRESS_FIELDS.contains(&sub))
                    || key.strip_prefix("metadata.").is_some_and(|k| !k.is_empty());
                !known
            })
            .map(String::as_str)
    }

    /// Names an owner that no system can be: neither `ferry` nor a
    /// connector's name (`Stripe`, `sales force`), which no change's source
    /// ever equals, so the field was silently ferry's (for configuration
    /// checks).
    pub fn invalid_owner(&self) -> Option<(&str, &str)> {
        self.0
            .iter()
            .find(|(_, owner)| {
                owner.as_str() != LOCAL_OWNER && !crate::runtime::valid_connector_name(owner)
            })
            .map(|(field, owner)| (field.as_str(), owner.as_str()))
    }
}

/// The outcome of a three-way merge.
#[derive(Debug, Clone, PartialEq)]
pub struct Merge {
    /// The merged canonical record: `id` (the local one, when it has one),
    /// `name`, `email`, `phone` (string or null), `address` (null when no
    /// subfield is set, else all six subfields, string or null) and
    /// `metadata` (an object of the keys set).
    pub merged: Value,
    /// Fields the local side changed since the base, sorted.
    pub local_changed: Vec<String>,
    /// Fields the remote side changed since the base, sorted.
    pub remote_changed: Vec<String>,
    /// Fields changed differently on both sides, sorted by field. Every one
    /// is in both change lists.
    pub conflicts: Vec<FieldConflict>,
    /// Fields whose remote value was not taken because another system owns
    /// them, and which differ on the remote: the remote needs the merged
    /// value pushed back.
    pub overridden: Vec<String>,
}

impl Merge {
    /// Whether applying the merged record would change `local` (compared
    /// with this module's equality, so a case-only email change is none).
    pub fn changes_local(&self, local: &Value) -> bool {
        !differing_fields(&self.merged, local).is_empty()
    }

    /// Whether the remote lacks part of the merged record that it cannot
    /// get unless ferry pushes it: a conflict kept locally, or an owned
    /// field the remote changed.
    pub fn remote_needs_push(&self) -> bool {
        !self.overridden.is_empty()
            || self
                .conflicts
                .iter()
                .any(|c| c.resolution == Resolution::Local)
    }

    /// Whether the merged record sets a field `remote` does not: on a first
    /// sync (no base), ferry's value of a field the remote left empty,
    /// which the merge keeps and only a push brings there.
    pub fn fills_remote_gaps(&self, remote: &Value) -> bool {
        let remote = Fields::of(remote);
        Fields::of(&self.merged)
            .0
            .keys()
            .any(|field| remote.get(field).is_none())
    }

    /// Whether a flagged conflict waits for a person.
    pub fn has_pending_conflicts(&self) -> bool {
        self.conflicts
            .iter()
            .any(|c| c.resolution == Resolution::Pending)
    }
}

/// The fields whose values differ between two canonical records, sorted,
/// compared as [`merge`] compares them (the `id` is ignored).
pub fn differing_fields(a: &Value, b: &Value) -> Vec<String> {
    let (a, b) = (Fields::of(a), Fields::of(b));
    field_names([&a, &b])
        .into_iter()
        .filter(|field| !same(field, a.get(field), b.get(field)))
        .collect()
}

/// Whether `snapshot` is only assumed ([`ASSUMED_BASE`]): what ferry
/// pushed, not what the remote answered.
pub fn is_assumed(snapshot: &Value) -> bool {
    snapshot.get(ASSUMED_BASE) == Some(&Value::Bool(true))
}

/// `taken` (a canonical record) with every field not named in `changed`
/// (names as [`differing_fields`] gives them) as `kept` holds it: set to
/// its value, or left out where `kept` does not set it. Other keys of
/// `taken` (its `id`) stay.
pub fn overlay(taken: &Value, kept: &Value, changed: &[&str]) -> Value {
    let mut out = taken.clone();
    let Some(fields) = out.as_object_mut() else {
        return out;
    };
    let keeps = |name: &str| !changed.contains(&name);
    let copy = |into: &mut Map<String, Value>, key: &str, from: Option<&Value>| match from {
        Some(value) => {
            into.insert(key.to_owned(), value.clone());
        }
        None => {
            into.remove(key);
        }
    };
    for name in SCALAR_FIELDS.into_iter().filter(|n| keeps(n)) {
        copy(fields, name, kept.get(name));
    }
    let kept_address = kept.get("address").and_then(Value::as_object);
    let mut address = fields
        .get("address")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for part in ADDRESS_FIELDS {
        if keeps(&format!("address.{part}")) {
            copy(&mut address, part, kept_address.and_then(|a| a.get(part)));
        }
    }
    let address_set = address.values().any(|v| !v.is_null());
    fields.insert(
        "address".into(),
        if address_set {
            Value::Object(address)
        } else {
            Value::Null
        },
    );
    let kept_metadata = kept.get("metadata").and_then(Value::as_object);
    let mut metadata = fields
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let keys: BTreeSet<String> = metadata
        .keys()
        .chain(kept_metadata.into_iter().flat_map(Map::keys))
        .cloned()
        .collect();
    for key in keys {
        if keeps(&format!("metadata.{key}")) {
            copy(&mut metadata, &key, kept_metadata.and_then(|m| m.get(&key)));
        }
    }
    fields.insert("metadata".into(), Value::Object(metadata));
    out
}

/// One field whose local and remote values differ (a reconciliation's
/// finding), with the last synced snapshot's value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct FieldDifference {
    /// Dotted field name.
    pub field: String,
    /// The local value (trimmed string or null).
    #[schema(value_type = Object)]
    pub local: Value,
    /// The remote value (trimmed string or null).
    #[schema(value_type = Object)]
    pub remote: Value,
    /// The snapshot's value (null when not set or never synced).
    #[schema(value_type = Object)]
    pub base: Value,
}

/// The fields on which `local` and `remote` disagree, as [`merge`] compares
/// them. A field the remote does not set, and did not set in `base` either,
/// is one its system does not know (a connector without phone numbers): it
/// is not a difference. One it set in `base` and no longer does is, unless
/// `base` is only assumed ([`ASSUMED_BASE`]: what ferry pushed, not what
/// the remote answered it keeps), as [`merge_owned`] reads it.
pub fn field_differences(
    local: &Value,
    remote: &Value,
    base: Option<&Value>,
) -> Vec<FieldDifference> {
    differences(local, remote, base, false)
}

/// [`field_differences`] for a local version the remote never took (its
/// push gave up): a field set locally and not remotely is one the push
/// would have set, a difference too.
pub fn unpushed_differences(
    local: &Value,
    remote: &Value,
    base: Option<&Value>,
) -> Vec<FieldDifference> {
    differences(local, remote, base, true)
}

fn differences(
    local: &Value,
    remote: &Value,
    base: Option<&Value>,
    unpushed: bool,
) -> Vec<FieldDifference> {
    let (l, r) = (Fields::of(local), Fields::of(remote));
    let b = base.map(Fields::of);
    let assumed = base.is_some_and(is_assumed);
    field_names([&l, &r])
        .into_iter()
        .filter(|field| !same(field, l.get(field), r.get(field)))
        .filter(|field| {
            r.get(field).is_some()
                || (unpushed && l.get(field).is_some())
                || (!assumed && b.as_ref().is_some_and(|b| b.get(field).is_some()))
        })
        .map(|field| FieldDifference {
            local: json(l.get(&field)),
            remote: json(r.get(&field)),
            base: json(b.as_ref().and_then(|b| b.get(&field))),
            field,
        })
        .collect()
}

/// Merges `sides` field by field; see the module docs for the rules.
pub fn merge(sides: Sides<'_>, policy: ConflictPolicy) -> Merge {
    merge_owned(sides, policy, &FieldOwners::default(), "")
}

/// [`merge`], with owned fields decided by their owner first: a field
/// `source` (the connector the remote record came through) owns takes the
/// remote's value whenever it differs; a field another system owns keeps
/// the local value, and if the remote's differs it is listed in
/// [`Merge::overridden`]. Neither is a conflict.
pub fn merge_owned(
    sides: Sides<'_>,
    policy: ConflictPolicy,
    owners: &FieldOwners,
    source: &str,
) -> Merge {
    let local = Fields::of(sides.local);
    let remote = Fields::of(sides.remote);
    let base = sides.base.map(Fields::of);
    let assumed = sides.base.is_some_and(is_assumed);

    let mut merged = BTreeMap::new();
    let mut local_changed = Vec::new();
    let mut remote_changed = Vec::new();
    let mut conflicts = Vec::new();
    let mut overridden = Vec::new();

    let mut names = field_names([&local, &remote]);
    if let Some(base) = &base {
        names.extend(field_names([base]));
    }
    // BTreeSet iteration keeps every output list sorted.
    for field in names {
        let l = local.get(&field);
        let r = remote.get(&field);
        let (local_moved, remote_moved) = match &base {
            Some(base) => {
                let b = base.get(&field);
                // An assumed base may hold what the remote never keeps: a
                // field the remote leaves unset is not known, not cleared.
                let remote_unknown = assumed && r.is_none();
                let remote_moved = !(remote_unknown || same(&field, r, b));
                (!same(&field, l, b), remote_moved)
            }
            // Never synced: a differing field is the remote's news, unless
            // the remote simply does not know it (see the module docs).
            None if r.is_none() || same(&field, l, r) => (false, false),
            // Nothing to disagree with: the remote fills a gap.
            None if l.is_none() => (false, true),
            // Under `flag` a person decides, and under `prefer_local`
            // ferry's value stands (a reconciliation's `push_local`: make
            // the remote match ferry); both are told by a conflict.
            None if matches!(policy, ConflictPolicy::Flag | ConflictPolicy::PreferLocal) => {
                (true, true)
            }
            None => (false, true),
        };

        let owner = owners.owner(&field);
        let take_remote = match (owner, local_moved, remote_moved) {
            // ferry holds no customer without an email: a remote that
            // cleared it keeps ferry's, pushed back to it. Taken, the
            // merged record failed validation, and so did every later
            // event of the record (its snapshot never moved on).
            (_, _, true) if field == "email" && r.is_none() && l.is_some() => {
                overridden.push(field.clone());
                false
            }
            // The owner's record: its value when it changed it (or, with
            // no base, when it holds one ferry's differs from). Not when
            // only ferry moved: an API write not yet pushed was reverted
            // by the owner's next event about anything else, and the
            // write's own push then skipped as synced.
            (Some(owner), _, remote_moved) if owner == source => {
                remote_moved && !same(&field, l, r)
            }
            (Some(_), _, _) => {
                if !same(&field, l, r) && remote_moved {
                    overridden.push(field.clone());
                }
                false
            }
            (None, local_moved, remote_moved) => match (local_moved, remote_moved) {
                (_, false) => false,
                (false, true) => true,
                (true, true) if same(&field, l, r) => false,
                (true, true) => {
                    let resolution = resolve(policy, &sides);
                    conflicts.push(FieldConflict {
                        field: field.clone(),
                        base: json(base.as_ref().and_then(|b| b.get(&field))),
                        local: json(l),
                        remote: json(r),
                        resolution,
                    });
                    resolution == Resolution::Remote
                }
            },
        };
        if local_moved {
            local_changed.push(field.clone());
        }
        if remote_moved {
            remote_changed.push(field.clone());
        }
        let value = if take_remote {
            remote.given(&field)
        } else {
            local.given(&field)
        };
        if let Some(value) = value {
            merged.insert(field, value.to_owned());
        }
    }

    Merge {
        merged: record(local_id(sides.local), &merged),
        local_changed,
        remote_changed,
        conflicts,
        overridden,
    }
}

/// Decides a conflict under `policy`.
fn resolve(policy: ConflictPolicy, sides: &Sides<'_>) -> Resolution {
    match policy {
        // A tie goes to the remote: remote clocks are often coarser (Stripe
        // stamps whole seconds, truncated), so a remote change stamped with
        // the same instant as a local one most likely happened after it. A
        // stamp of a whole second covers that second: a local edit at .300
        // and a Stripe edit at .700, stamped .000, is a tie, not a local
        // win (compared to the millisecond, a local edit beat every remote
        // edit of its own second).
        ConflictPolicy::LastWriterWins
            if local_is_later(sides.local_changed_at_ms, sides.remote_changed_at_ms) =>
        {
            Resolution::Local
        }
        ConflictPolicy::LastWriterWins => Resolution::Remote,
        ConflictPolicy::PreferLocal => Resolution::Local,
        ConflictPolicy::PreferRemote => Resolution::Remote,
        ConflictPolicy::Flag => Resolution::Pending,
    }
}

/// Whether a local change at `local_ms` came after a remote one stamped
/// `remote_ms`: in whole seconds when the remote's stamp is one (its clock
/// may have no finer), to the millisecond otherwise.
fn local_is_later(local_ms: i64, remote_ms: i64) -> bool {
    if remote_ms % 1_000 == 0 {
        local_ms.div_euclid(1_000) > remote_ms.div_euclid(1_000)
    } else {
        local_ms > remote_ms
    }
}

/// A record flattened to its set fields (a value blank once trimmed is not
/// set): dotted name → value as given. Compared trimmed ([`Fields::get`]);
/// a merge writes a metadata value as the side it takes gave it
/// ([`Fields::given`]; trimmed, `" gold "` came back changed, and a value
/// ending in a line break lost it), the catalog's own fields trimmed.
struct Fields(BTreeMap<String, String>);

impl Fields {
    fn of(record: &Value) -> Self {
        let mut fields = BTreeMap::new();
        let mut put = |name: String, value: Option<&Value>| {
            if let Some(text) = value
                .and_then(Value::as_str)
                .filter(|s| set_text(s).is_some())
            {
                fields.insert(name, text.to_owned());
            }
        };
        for name in SCALAR_FIELDS {
            put(name.to_owned(), record.get(name));
        }
        if let Some(address) = record.get("address") {
            for name in ADDRESS_FIELDS {
                put(format!("address.{name}"), address.get(name));
            }
        }
        if let Some(metadata) = record.get("metadata").and_then(Value::as_object) {
            for (key, value) in metadata {
                put(format!("metadata.{key}"), Some(value));
            }
        }
        Fields(fields)
    }

    /// The field's value, trimmed, as merges compare it.
    fn get(&self, field: &str) -> Option<&str> {
        self.0.get(field).map(|s| s.trim())
    }

    /// The field's value as a merge writes it: a metadata value as the
    /// record gave it (opaque to ferry), any other trimmed.
    fn given(&self, field: &str) -> Option<&str> {
        if field.starts_with("metadata.") {
            self.0.get(field).map(String::as_str)
        } else {
            self.get(field)
        }
    }
}

/// The trimmed text of a value; `None` for "not set" (blank).
fn set_text(value: &str) -> Option<&str> {
    Some(value.trim()).filter(|s| !s.is_empty())
}

/// Every field set in any of `records`, sorted.
fn field_names<const N: usize>(records: [&Fields; N]) -> BTreeSet<String> {
    records
        .iter()
        .flat_map(|fields| fields.0.keys().cloned())
        .collect()
}

/// Whether two values of `field` are the same (both already trimmed).
fn same(field: &str, a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        // Emails are stored normalised (lowercased, NFC, ASCII domain) and
        // most remotes keep whatever was typed.
        (Some(a), Some(b)) if field == "email" => normalise_email(a) == normalise_email(b),
        // Country codes are stored upper-case (`gb` is kept as `GB`), and
        // a remote may keep what was typed: its `gb` is no edit.
        (Some(a), Some(b)) if field == "address.country" => a.eq_ignore_ascii_case(b),
        _ => a == b,
    }
}

/// Whether two values of `field`, as text a resolution or the API holds,
/// are the same as a merge compares them: trimmed, empty as unset, emails
/// and country codes as [`same`] compares them.
pub fn same_text(field: &str, a: Option<&str>, b: Option<&str>) -> bool {
    fn set(value: Option<&str>) -> Option<&str> {
        value.map(str::trim).filter(|s| !s.is_empty())
    }
    same(field, set(a), set(b))
}

fn json(value: Option<&str>) -> Value {
    value.map_or(Value::Null, Value::from)
}

/// The local record's `id`, which the merged record keeps: it is what the
/// merged record is written back to.
fn local_id(local: &Value) -> Option<&str> {
    local.get("id").and_then(Value::as_str)
}

/// Builds the canonical record from its set fields.
fn record(id: Option<&str>, fields: &BTreeMap<String, String>) -> Value {
    let mut record = Map::new();
    if let Some(id) = id {
        record.insert("id".into(), id.into());
    }
    for name in SCALAR_FIELDS {
        let value = fields.get(name).map(String::as_str);
        let value = match value {
            Some(email) if name == "email" => Value::from(normalise_email(email)),
            other => json(other),
        };
        record.insert(name.into(), value);
    }
    let mut address = Map::new();
    for name in ADDRESS_FIELDS {
        let value = fields.get(&format!("address.{name}")).map(String::as_str);
        address.insert(name.into(), json(value));
    }
    let address_set = address.values().any(|v| !v.is_null());
    record.insert(
        "address".into(),
        if address_set {
            Value::Object(address)
        } else {
            Value::Null
        },
    );
    let metadata: Map<String, Value> = fields
        .iter()
        .filter_map(|(field, value)| {
            let key = field.strip_prefix("metadata.")?;
            Some((key.to_owned(), Value::from(value.as_str())))
        })
        .collect();
    record.insert("metadata".into(), Value::Object(metadata));
    Value::Object(record)
}

/// A dotted field (`name`, `address.city`, `metadata.tier`) of a canonical
/// record.
pub(crate) fn field_of<'a>(
    record: &'a serde_json::Value,
    field: &str,
) -> Option<&'a serde_json::Value> {
    match field.split_once('.') {
        None => record.get(field),
        Some((parent, child)) => record.get(parent).and_then(|p| p.get(child)),
    }
}

/// Sets a dotted field (`name`, `address.city`, `metadata.tier`) of a
/// canonical record.
pub(crate) fn set_field(record: &mut serde_json::Value, field: &str, value: serde_json::Value) {
    let Some(object) = record.as_object_mut() else {
        return;
    };
    match field.split_once('.') {
        None => {
            object.insert(field.to_owned(), value);
        }
        Some((parent, child)) => {
            let nested = object
                .entry(parent.to_owned())
                .or_insert_with(|| serde_json::json!({}));
            if !nested.is_object() {
                *nested = serde_json::json!({});
            }
            if let Some(nested) = nested.as_object_mut() {
                if value.is_null() {
                    nested.remove(child);
                } else {
                    nested.insert(child.to_owned(), value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn customer() -> Value {
        json!({
            "id": "cus_local",
            "name": "Ada Lovelace",
            "email": "ada@example.com",
            "phone": "+442079460000",
            "address": {
                "line1": "12 St James's Square",
                "line2": null,
                "city": "London",
                "state": null,
                "postal_code": "SW1Y 4JH",
                "country": "GB"
            },
            "metadata": { "tier": "gold" }
        })
    }

    /// `record` with the dotted `field` set to `value` (null removes it).
    fn with(record: &Value, field: &str, value: Value) -> Value {
        let mut record = record.clone();
        let mut path: Vec<&str> = match field.split_once('.') {
            Some((head, tail)) => vec![head, tail],
            None => vec![field],
        };
        let last = path.pop().expect("a field name");
        let mut target = &mut record;
        for step in path {
            if !target[step].is_object() {
                target[step] = json!({});
            }
            target = &mut target[step];
        }
        let object = target.as_object_mut().expect("an object");
        if value.is_null() {
            object.remove(last);
        } else {
            object.insert(last.to_owned(), value);
        }
        record
    }

    fn run(base: Option<&Value>, local: &Value, remote: &Value, policy: ConflictPolicy) -> Merge {
        merge(
            Sides {
                base,
                local,
                remote,
                local_changed_at_ms: 1_000,
                remote_changed_at_ms: 2_000,
            },
            policy,
        )
    }

    const ALL: [ConflictPolicy; 4] = [
        ConflictPolicy::LastWriterWins,
        ConflictPolicy::PreferLocal,
        ConflictPolicy::PreferRemote,
        ConflictPolicy::Flag,
    ];

    /// A metadata value is written as the side taken gave it, spaces and
    /// line breaks kept (it is opaque to ferry); compared trimmed, so no
    /// side moved it. The catalog's own fields are written trimmed.
    /// A remote that clears the email (a Salesforce user emptied the
    /// Contact's Email) keeps ferry's, which is pushed back: taken, the
    /// merged record had no email and every later event of the record
    /// was dead-lettered. Whatever the policy, and with ferry's own
    /// change of it too.
    #[test]
    fn a_cleared_email_keeps_ferrys_and_is_pushed_back() {
        let base = json!({"id": "r_1", "name": "Ada", "email": "ada@example.com"});
        let remote = json!({"id": "r_1", "name": "Ada King", "email": null});
        for local_email in ["ada@example.com", "ada.king@example.com"] {
            let local = json!({"id": "cus_1", "name": "Ada", "email": local_email});
            for policy in [
                ConflictPolicy::LastWriterWins,
                ConflictPolicy::PreferRemote,
                ConflictPolicy::PreferLocal,
                ConflictPolicy::Flag,
            ] {
                let merged = run(Some(&base), &local, &remote, policy);
                assert_eq!(merged.merged["email"], local_email, "{policy:?}");
                assert_eq!(merged.merged["name"], "Ada King", "{policy:?}");
                assert_eq!(merged.overridden, vec!["email".to_owned()], "{policy:?}");
                assert!(merged.conflicts.is_empty(), "{policy:?}");
                assert!(merged.remote_needs_push(), "{policy:?}");
            }
        }
    }

    #[test]
    fn metadata_values_are_written_as_given() {
        let base = with(&customer(), "metadata.tier", json!(" gold "));
        let base = with(&base, "metadata.ref", json!("A-1\n"));
        let remote = with(&base, "name", json!("Ada King "));
        let remote = with(&remote, "metadata.ref", json!("A-1"));
        for policy in ALL {
            let merge = run(Some(&base), &base, &remote, policy);
            assert_eq!(merge.merged["metadata"]["tier"], " gold ", "{policy:?}");
            assert_eq!(merge.merged["metadata"]["ref"], "A-1\n", "{policy:?}");
            assert_eq!(merge.merged["name"], "Ada King", "{policy:?}");
            assert_eq!(merge.remote_changed, ["name"], "{policy:?}");
        }
    }

    #[test]
    fn no_changes_merges_to_the_local_record() {
        let base = customer();
        let remote = with(&base, "id", json!("cus_remote"));
        for policy in ALL {
            let merge = run(Some(&base), &base, &remote, policy);
            assert_eq!(merge.merged, base, "{policy:?}");
            assert!(merge.local_changed.is_empty());
            assert!(merge.remote_changed.is_empty());
            assert!(merge.conflicts.is_empty());
            assert!(!merge.changes_local(&base));
            assert!(!merge.has_pending_conflicts());
        }
    }

    /// A first sync keeps ferry's phone where the remote has none, and
    /// takes the remote's city where ferry has none: the remote still lacks
    /// the phone (a push must bring it), not the city.
    #[test]
    fn a_first_sync_fills_gaps_both_ways() {
        let local = with(
            &with(&customer(), "address.city", Value::Null),
            "id",
            json!("cus_local"),
        );
        let remote = with(
            &with(&customer(), "phone", Value::Null),
            "id",
            json!("cus_remote"),
        );
        for policy in ALL {
            let merge = run(None, &local, &remote, policy);
            assert_eq!(merge.merged, customer(), "{policy:?}");
            assert!(merge.conflicts.is_empty());
            assert!(merge.fills_remote_gaps(&remote), "{policy:?}");
            assert!(!merge.fills_remote_gaps(&merge.merged));
        }
    }

    /// A base that is what ferry pushed to a connector that returned no
    /// record: a remote that keeps only names and emails renames the
    /// customer, and the phone, address and metadata it never kept stay.
    /// With a base the remote reported, the same record clears them.
    #[test]
    fn an_assumed_base_does_not_clear_what_the_remote_never_kept() {
        let local = customer();
        let mut assumed = customer();
        assumed[ASSUMED_BASE] = json!(true);
        let remote = json!({"id": "r_1", "name": "Augusta Ada King", "email": "ada@example.com"});
        for policy in ALL {
            let merge = run(Some(&assumed), &local, &remote, policy);
            assert_eq!(merge.merged["name"], "Augusta Ada King", "{policy:?}");
            assert_eq!(merge.merged["phone"], local["phone"], "{policy:?}");
            assert_eq!(merge.merged["metadata"], local["metadata"], "{policy:?}");
            assert_eq!(merge.merged["address"], local["address"], "{policy:?}");
            assert_eq!(merge.remote_changed, ["name"], "{policy:?}");
            assert!(merge.conflicts.is_empty(), "{policy:?}");
        }
        let reported = run(Some(&local), &local, &remote, ConflictPolicy::Flag);
        assert_eq!(reported.merged["phone"], Value::Null);
    }

    /// A connector whose push answers no record (its snapshot assumed)
    /// and whose system keeps no phone: a reconciliation found every such
    /// customer `different` on every run, and `merge` pushed it again each
    /// time (the answer again assumed).
    #[test]
    fn field_differences_ignore_what_an_assumed_base_holds() {
        let local = customer();
        let mut assumed = customer();
        assumed[ASSUMED_BASE] = json!(true);
        let remote = json!({"id": "r_1", "name": "Ada Lovelace", "email": "ada@example.com"});
        assert!(field_differences(&local, &remote, Some(&assumed)).is_empty());
        let cleared = field_differences(&local, &remote, Some(&local));
        assert!(
            cleared.iter().any(|d| d.field == "phone"),
            "a base the remote answered: cleared"
        );
    }

    #[test]
    fn a_remote_only_change_is_taken() {
        let base = customer();
        let remote = with(&base, "name", json!("Augusta Ada King"));
        let merge = run(Some(&base), &base, &remote, ConflictPolicy::Flag);
        assert_eq!(merge.merged["name"], "Augusta Ada King");
        assert_eq!(merge.remote_changed, ["name"]);
        assert!(merge.local_changed.is_empty());
        assert!(merge.conflicts.is_empty());
        assert!(merge.changes_local(&base));
    }

    #[test]
    fn a_local_only_change_is_kept() {
        let base = customer();
        let local = with(&base, "phone", json!("+441234567890"));
        let merge = run(Some(&base), &local, &base, ConflictPolicy::PreferRemote);
        assert_eq!(merge.merged, local);
        assert_eq!(merge.local_changed, ["phone"]);
        assert!(merge.remote_changed.is_empty());
        assert!(merge.conflicts.is_empty());
        assert!(!merge.changes_local(&local));
    }

    #[test]
    fn both_sides_making_the_same_change_is_no_conflict() {
        let base = customer();
        let local = with(&base, "name", json!("Ada King"));
        let remote = with(&base, "name", json!(" Ada King "));
        for policy in ALL {
            let merge = run(Some(&base), &local, &remote, policy);
            assert_eq!(merge.merged["name"], "Ada King");
            assert_eq!(merge.local_changed, ["name"]);
            assert_eq!(merge.remote_changed, ["name"]);
            assert!(merge.conflicts.is_empty(), "{policy:?}");
            assert!(!merge.changes_local(&local));
        }
    }

    #[test]
    fn different_fields_on_each_side_merge_cleanly() {
        let base = customer();
        let local = with(&base, "phone", json!("+441234567890"));
        let remote = with(&base, "name", json!("Ada King"));
        let merge = run(Some(&base), &local, &remote, ConflictPolicy::Flag);
        let expected = with(&local, "name", json!("Ada King"));
        assert_eq!(merge.merged, expected);
        assert_eq!(merge.local_changed, ["phone"]);
        assert_eq!(merge.remote_changed, ["name"]);
        assert!(merge.conflicts.is_empty());
        assert!(!merge.has_pending_conflicts());
    }

    #[test]
    fn the_same_field_changed_differently_follows_each_policy() {
        let base = customer();
        let local = with(&base, "name", json!("Local Name"));
        let remote = with(&base, "name", json!("Remote Name"));
        let cases = [
            (ConflictPolicy::PreferLocal, Resolution::Local, "Local Name"),
            (
                ConflictPolicy::PreferRemote,
                Resolution::Remote,
                "Remote Name",
            ),
            (ConflictPolicy::Flag, Resolution::Pending, "Local Name"),
            // The remote (2000 ms) wrote after the local side (1000 ms).
            (
                ConflictPolicy::LastWriterWins,
                Resolution::Remote,
                "Remote Name",
            ),
        ];
        for (policy, resolution, name) in cases {
            let merge = run(Some(&base), &local, &remote, policy);
            assert_eq!(merge.merged["name"], name, "{policy:?}");
            assert_eq!(
                merge.conflicts,
                [FieldConflict {
                    field: "name".into(),
                    base: json!("Ada Lovelace"),
                    local: json!("Local Name"),
                    remote: json!("Remote Name"),
                    resolution,
                }]
            );
            assert_eq!(merge.local_changed, ["name"]);
            assert_eq!(merge.remote_changed, ["name"]);
            assert_eq!(
                merge.has_pending_conflicts(),
                policy == ConflictPolicy::Flag
            );
        }
    }

    #[test]
    fn last_writer_wins_compares_timestamps_and_ties_go_to_remote() {
        let base = customer();
        let local = with(&base, "email", json!("local@example.com"));
        let remote = with(&base, "email", json!("remote@example.com"));
        for (local_at, remote_at, expected) in [
            (3_000, 2_000, "local@example.com"),
            (2_000, 3_000, "remote@example.com"),
            (2_000, 2_000, "remote@example.com"),
            // A remote stamp of a whole second (Stripe's, truncated)
            // covers that second: a local edit within it is a tie.
            (10_300, 10_000, "remote@example.com"),
            (11_000, 10_000, "local@example.com"),
            // A stamp to the millisecond is compared to the millisecond.
            (10_300, 10_250, "local@example.com"),
        ] {
            let merge = merge(
                Sides {
                    base: Some(&base),
                    local: &local,
                    remote: &remote,
                    local_changed_at_ms: local_at,
                    remote_changed_at_ms: remote_at,
                },
                ConflictPolicy::LastWriterWins,
            );
            assert_eq!(merge.merged["email"], expected, "{local_at} vs {remote_at}");
            assert_eq!(merge.conflicts.len(), 1);
        }
    }

    #[test]
    fn address_subfields_merge_separately() {
        let base = customer();
        let local = with(&base, "address.line1", json!("1 New Street"));
        let remote = with(&base, "address.city", json!("Cambridge"));
        let merge = run(Some(&base), &local, &remote, ConflictPolicy::Flag);
        assert_eq!(merge.merged["address"]["line1"], "1 New Street");
        assert_eq!(merge.merged["address"]["city"], "Cambridge");
        assert_eq!(merge.merged["address"]["country"], "GB");
        assert_eq!(merge.local_changed, ["address.line1"]);
        assert_eq!(merge.remote_changed, ["address.city"]);
        assert!(merge.conflicts.is_empty());

        // The same subfield on both sides conflicts, named by its path.
        let remote = with(&base, "address.line1", json!("2 Other Street"));
        let merge = run(Some(&base), &local, &remote, ConflictPolicy::PreferRemote);
        assert_eq!(merge.conflicts.len(), 1);
        assert_eq!(merge.conflicts[0].field, "address.line1");
        assert_eq!(merge.merged["address"]["line1"], "2 Other Street");
    }

    #[test]
    fn an_address_with_nothing_set_becomes_null() {
        let base = customer();
        let remote = with(&base, "address", Value::Null);
        let merge = run(Some(&base), &base, &remote, ConflictPolicy::PreferLocal);
        assert_eq!(merge.merged["address"], Value::Null);
        assert_eq!(
            merge.remote_changed,
            [
                "address.city",
                "address.country",
                "address.line1",
                "address.postal_code"
            ]
        );

        // An address set only through the merge gets all six subfields.
        let bare = json!({ "email": "ada@example.com" });
        let remote = with(&bare, "address.country", json!("FR"));
        let merge = run(Some(&bare), &bare, &remote, ConflictPolicy::Flag);
        assert_eq!(
            merge.merged["address"],
            json!({
                "line1": null, "line2": null, "city": null,
                "state": null, "postal_code": null, "country": "FR"
            })
        );
    }

    #[test]
    fn metadata_keys_are_added_removed_and_changed_one_by_one() {
        let base = with(
            &customer(),
            "metadata",
            json!({ "tier": "gold", "source": "web", "old": "x" }),
        );
        let local = with(&base, "metadata.source", json!("shop"));
        let local = with(&local, "metadata.local_key", json!("l"));
        let remote = with(&base, "metadata.tier", json!("platinum"));
        let remote = with(&remote, "metadata.old", Value::Null);
        let remote = with(&remote, "metadata.remote_key", json!("r"));
        let merge = run(Some(&base), &local, &remote, ConflictPolicy::Flag);
        assert_eq!(
            merge.merged["metadata"],
            json!({ "tier": "platinum", "source": "shop", "local_key": "l", "remote_key": "r" })
        );
        assert_eq!(
            merge.local_changed,
            ["metadata.local_key", "metadata.source"]
        );
        assert_eq!(
            merge.remote_changed,
            ["metadata.old", "metadata.remote_key", "metadata.tier"]
        );
        assert!(merge.conflicts.is_empty());

        // A key removed on one side and changed on the other conflicts.
        let local = with(&base, "metadata.tier", Value::Null);
        let merge = run(Some(&base), &local, &remote, ConflictPolicy::PreferLocal);
        assert_eq!(merge.conflicts.len(), 1);
        assert_eq!(merge.conflicts[0].field, "metadata.tier");
        assert_eq!(merge.conflicts[0].local, Value::Null);
        assert_eq!(merge.conflicts[0].remote, "platinum");
        assert_eq!(merge.merged["metadata"].get("tier"), None);
        assert_eq!(
            merge.merged["metadata"],
            json!({ "source": "web", "remote_key": "r" })
        );
    }

    #[test]
    fn absent_null_and_empty_are_all_unset() {
        let base = json!({ "email": "ada@example.com", "name": null, "address": { "city": "" } });
        let local = json!({
            "email": "ada@example.com", "phone": "", "metadata": { "k": "" },
            "address": null
        });
        let remote = json!({
            "email": "ada@example.com", "name": "  ", "phone": null,
            "address": { "line1": null, "city": null }, "metadata": {}
        });
        for policy in ALL {
            let merge = run(Some(&base), &local, &remote, policy);
            assert!(merge.local_changed.is_empty(), "{policy:?}");
            assert!(merge.remote_changed.is_empty(), "{policy:?}");
            assert!(merge.conflicts.is_empty());
            assert!(!merge.changes_local(&local));
            assert_eq!(
                merge.merged,
                json!({
                    "name": null, "email": "ada@example.com", "phone": null,
                    "address": null, "metadata": {}
                })
            );
        }
        assert!(differing_fields(&base, &remote).is_empty());
    }

    #[test]
    fn values_that_are_not_strings_count_as_unset() {
        let base = customer();
        let remote = with(&base, "phone", json!(442079460000_i64));
        let remote = with(&remote, "metadata", json!("not an object"));
        let merge = run(Some(&base), &base, &remote, ConflictPolicy::PreferRemote);
        assert_eq!(merge.remote_changed, ["metadata.tier", "phone"]);
        assert_eq!(merge.merged["phone"], Value::Null);
        assert_eq!(merge.merged["metadata"], json!({}));

        // A record that is not even an object merges without panicking.
        let merge = run(
            Some(&json!(null)),
            &json!([1, 2]),
            &json!("x"),
            ConflictPolicy::Flag,
        );
        assert_eq!(
            merge.merged,
            json!({ "name": null, "email": null, "phone": null, "address": null, "metadata": {} })
        );
    }

    #[test]
    fn email_compares_case_insensitively_after_trim() {
        let base = customer();
        let remote = with(&base, "email", json!("  ADA@Example.COM "));
        let merge = run(Some(&base), &base, &remote, ConflictPolicy::Flag);
        assert!(merge.remote_changed.is_empty());
        assert!(!merge.changes_local(&base));

        // Both changed to the same address in different case: no conflict.
        let local = with(&base, "email", json!("ada.king@example.com"));
        let remote = with(&base, "email", json!("Ada.King@Example.com"));
        let merge = run(Some(&base), &local, &remote, ConflictPolicy::Flag);
        assert!(merge.conflicts.is_empty());
        assert_eq!(merge.merged["email"], "ada.king@example.com");

        // A remote-only change is taken, lowercased as ferry stores emails.
        let remote = with(&base, "email", json!("Lovelace@Example.com"));
        let merge = run(Some(&base), &base, &remote, ConflictPolicy::Flag);
        assert_eq!(merge.remote_changed, ["email"]);
        assert_eq!(merge.merged["email"], "lovelace@example.com");
    }

    /// A remote that keeps `gb` as typed, against ferry's `GB`: neither
    /// side changed it, and the remote's real change is taken without a
    /// conflict. Before, `gb`/`GB` counted as a local edit: every remote
    /// change of the country was a conflict, held or overwritten.
    #[test]
    fn country_codes_compare_without_case() {
        let local = customer();
        let base = with(&local, "address.country", json!("gb"));
        let merge = run(Some(&base), &local, &base, ConflictPolicy::Flag);
        assert!(merge.local_changed.is_empty(), "{:?}", merge.local_changed);
        assert!(!merge.changes_local(&local));
        let remote = with(&base, "address.country", json!("fr"));
        let merge = run(Some(&base), &local, &remote, ConflictPolicy::Flag);
        assert!(merge.conflicts.is_empty(), "{:?}", merge.conflicts);
        assert_eq!(merge.remote_changed, ["address.country"]);
        // Linked by email, with no base: no conflict over case alone.
        let merge = run(None, &local, &base, ConflictPolicy::Flag);
        assert!(merge.conflicts.is_empty(), "{:?}", merge.conflicts);
    }

    #[test]
    fn the_id_is_not_a_field_and_the_local_one_is_kept() {
        let base = with(&customer(), "id", json!("cus_remote"));
        let local = with(&customer(), "id", json!("0193a5c4-local"));
        let remote = with(&base, "id", json!("cus_other"));
        let merge = run(Some(&base), &local, &remote, ConflictPolicy::Flag);
        assert_eq!(merge.merged["id"], "0193a5c4-local");
        assert!(merge.local_changed.is_empty());
        assert!(merge.remote_changed.is_empty());
        assert!(differing_fields(&local, &remote).is_empty());
    }

    #[test]
    fn with_no_base_differing_fields_are_remote_changes() {
        let local = customer();
        let remote = with(&local, "name", json!("Ada King"));
        let remote = with(&remote, "address.city", json!("Cambridge"));
        let remote = with(&remote, "metadata.plan", json!("pro"));
        for policy in [ConflictPolicy::LastWriterWins, ConflictPolicy::PreferRemote] {
            let merge = run(None, &local, &remote, policy);
            assert_eq!(
                merge.merged,
                with(&remote, "id", json!("cus_local")),
                "{policy:?}"
            );
            assert_eq!(
                merge.remote_changed,
                ["address.city", "metadata.plan", "name"]
            );
            assert!(merge.local_changed.is_empty());
            assert!(merge.conflicts.is_empty());
        }
    }

    /// A reconciliation's `push_local` (make the remote match ferry) of a
    /// record matched by email: ferry's values stand, the remote's news
    /// fills only gaps. Before, it took the remote's values, as under
    /// every policy but `flag`.
    #[test]
    fn with_no_base_prefer_local_keeps_ferrys_values() {
        let local = customer();
        let remote = with(&local, "name", json!("Ada King"));
        let remote = with(&remote, "metadata.plan", json!("pro"));
        let merge = run(None, &local, &remote, ConflictPolicy::PreferLocal);
        assert_eq!(merge.merged["name"], "Ada Lovelace");
        assert_eq!(merge.merged["metadata"]["plan"], "pro");
        assert_eq!(
            merge.conflicts,
            [FieldConflict {
                field: "name".into(),
                base: Value::Null,
                local: json!("Ada Lovelace"),
                remote: json!("Ada King"),
                resolution: Resolution::Local,
            }]
        );
        assert!(!merge.has_pending_conflicts());
        assert!(merge.remote_needs_push(), "ferry's name goes to the remote");
    }

    #[test]
    fn with_no_base_and_flag_differing_values_conflict() {
        let local = customer();
        let remote = with(&local, "name", json!("Ada King"));
        let remote = with(&remote, "metadata.plan", json!("pro"));
        let merge = run(None, &local, &remote, ConflictPolicy::Flag);
        // The remote sets a key the local side lacks: nothing to disagree on.
        assert_eq!(merge.merged["metadata"]["plan"], "pro");
        assert_eq!(merge.merged["name"], "Ada Lovelace");
        assert_eq!(
            merge.conflicts,
            [FieldConflict {
                field: "name".into(),
                base: Value::Null,
                local: json!("Ada Lovelace"),
                remote: json!("Ada King"),
                resolution: Resolution::Pending,
            }]
        );
        assert_eq!(merge.local_changed, ["name"]);
        assert_eq!(merge.remote_changed, ["metadata.plan", "name"]);
        assert!(merge.has_pending_conflicts());
    }

    #[test]
    fn with_no_base_what_the_remote_does_not_set_is_kept() {
        let local = customer();
        let remote = json!({ "id": "cus_remote", "email": "ada@example.com", "name": "Ada" });
        for policy in ALL {
            let merge = run(None, &local, &remote, policy);
            assert_eq!(merge.merged["phone"], "+442079460000", "{policy:?}");
            assert_eq!(merge.merged["address"], local["address"]);
            assert_eq!(merge.merged["metadata"], local["metadata"]);
            let taken = !matches!(policy, ConflictPolicy::Flag | ConflictPolicy::PreferLocal);
            assert_eq!(
                merge.merged["name"],
                if taken { "Ada" } else { "Ada Lovelace" }
            );
            assert_eq!(merge.remote_changed, ["name"]);
        }
    }

    #[test]
    fn with_a_base_a_remote_deletion_is_a_change() {
        let base = customer();
        let remote = with(&base, "phone", Value::Null);
        let merge = run(Some(&base), &base, &remote, ConflictPolicy::LastWriterWins);
        assert_eq!(merge.remote_changed, ["phone"]);
        assert_eq!(merge.merged["phone"], Value::Null);
    }

    #[test]
    fn policies_round_trip_as_snake_case() {
        let text = serde_json::to_string(&ALL).expect("serialises");
        assert_eq!(
            text,
            r#"["last_writer_wins","prefer_local","prefer_remote","flag"]"#
        );
        let back: Vec<ConflictPolicy> = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, ALL);
        assert_eq!(
            serde_json::to_value(Resolution::Pending).expect("serialises"),
            "pending"
        );
    }

    fn owners(pairs: &[(&str, &str)]) -> FieldOwners {
        FieldOwners::new(
            pairs
                .iter()
                .map(|(f, o)| ((*f).to_owned(), (*o).to_owned()))
                .collect(),
        )
    }

    fn run_owned(
        base: Option<&Value>,
        local: &Value,
        remote: &Value,
        owners: &FieldOwners,
        source: &str,
    ) -> Merge {
        merge_owned(
            Sides {
                base,
                local,
                remote,
                local_changed_at_ms: 1_000,
                remote_changed_at_ms: 2_000,
            },
            ConflictPolicy::Flag,
            owners,
            source,
        )
    }

    #[test]
    fn an_owner_wins_both_ways_and_nothing_conflicts() {
        let base = customer();
        let local = with(
            &with(&base, "phone", json!("+1 local")),
            "name",
            json!("Local"),
        );
        let remote = with(
            &with(&base, "phone", json!("+1 remote")),
            "name",
            json!("Remote"),
        );
        let owned = owners(&[("phone", "salesforce"), ("name", LOCAL_OWNER)]);
        let merged = run_owned(Some(&base), &local, &remote, &owned, "salesforce");
        assert_eq!(merged.merged["phone"], "+1 remote", "the owner's value");
        assert_eq!(merged.merged["name"], "Local", "ferry's own field");
        assert!(merged.conflicts.is_empty(), "{:?}", merged.conflicts);
        assert_eq!(merged.overridden, vec!["name".to_owned()]);
        assert!(merged.remote_needs_push());
        // The same record from another system: neither field is taken.
        let other = run_owned(Some(&base), &local, &remote, &owned, "stripe");
        assert_eq!(
            (
                other.merged["phone"].as_str(),
                other.merged["name"].as_str()
            ),
            (Some("+1 local"), Some("Local"))
        );
        assert_eq!(
            other.overridden,
            vec!["name".to_owned(), "phone".to_owned()]
        );
    }

    #[test]
    fn an_owner_leaves_alone_what_only_ferry_changed() {
        let base = customer();
        let local = with(&base, "phone", json!("+1 written by the API"));
        let remote = with(&base, "name", json!("Renamed at the owner"));
        let owned = owners(&[("phone", "stripe")]);
        let merged = run_owned(Some(&base), &local, &remote, &owned, "stripe");
        assert_eq!(merged.merged["phone"], "+1 written by the API");
        assert_eq!(merged.merged["name"], "Renamed at the owner");
        assert_eq!(
            merged.local_changed,
            vec!["phone".to_owned()],
            "the owner gets ferry's phone"
        );
        // With no base, the owner's value decides where the two differ.
        let first = run_owned(None, &local, &base, &owned, "stripe");
        assert_eq!(first.merged["phone"], base["phone"]);
    }

    #[test]
    fn a_group_owner_covers_its_subfields_and_a_subfield_owner_beats_it() {
        let owned = owners(&[
            ("address", "stripe"),
            ("address.city", "salesforce"),
            ("metadata", "stripe"),
        ]);
        assert_eq!(owned.owner("address.line1"), Some("stripe"));
        assert_eq!(owned.owner("address.city"), Some("salesforce"));
        assert_eq!(owned.owner("metadata.tier"), Some("stripe"));
        assert_eq!(owned.owner("phone"), None);
        let base = customer();
        let remote = with(
            &with(&base, "address.line1", json!("1 New St")),
            "address.city",
            json!("Bath"),
        );
        let merged = run_owned(Some(&base), &base, &remote, &owned, "stripe");
        assert_eq!(merged.merged["address"]["line1"], "1 New St");
        assert_eq!(
            merged.merged["address"]["city"], "London",
            "salesforce owns the city"
        );
        assert_eq!(merged.overridden, vec!["address.city".to_owned()]);
    }

    #[test]
    fn unknown_owner_keys_are_named() {
        assert_eq!(
            owners(&[("phone", "x"), ("address.zip", "x")]).invalid_key(),
            Some("address.zip")
        );
        assert_eq!(
            owners(&[("shoe_size", "x")]).invalid_key(),
            Some("shoe_size")
        );
        assert_eq!(
            owners(&[("metadata.tier", "x"), ("email", "ferry")]).invalid_key(),
            None
        );
        // An owner no change's source can equal: the field was silently
        // ferry's.
        for owner in ["Stripe", "sales force", ""] {
            assert_eq!(
                owners(&[("phone", owner)]).invalid_owner(),
                Some(("phone", owner)),
                "{owner:?}"
            );
        }
        assert_eq!(
            owners(&[
                ("phone", "salesforce"),
                ("name", "ferry"),
                ("email", "my-crm2")
            ])
            .invalid_owner(),
            None
        );
    }

    #[test]
    fn differences_ignore_fields_the_remote_never_knew() {
        let local = customer();
        // The remote has no metadata and no phone, and never had.
        let remote = with(&with(&local, "metadata", json!(null)), "phone", json!(null));
        assert!(field_differences(&local, &remote, None).is_empty());
        assert!(field_differences(&local, &remote, Some(&remote)).is_empty());
        // It had a phone when last synced: clearing it is a difference.
        let differences = field_differences(&local, &remote, Some(&local));
        let names: Vec<&str> = differences.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(names, ["metadata.tier", "phone"]);
        assert_eq!(differences[1].local, "+442079460000");
        assert_eq!(differences[1].remote, Value::Null);
        // Email case is not a difference; a changed city is.
        let remote = with(
            &with(&local, "email", json!("ADA@example.com")),
            "address.city",
            json!("Bath"),
        );
        let differences = field_differences(&local, &remote, None);
        assert_eq!(differences.len(), 1);
        assert_eq!(
            (
                differences[0].field.as_str(),
                differences[0].remote.as_str()
            ),
            ("address.city", Some("Bath"))
        );
    }
}
