//! ferry's canonical customer: the JSON every connector reads from
//! `push-request.record` and writes into events and remote records
//! (documented in `docs/connector-contract.md`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A customer in ferry's canonical model.
///
/// Every field is optional on the wire so a partial record (a remote that
/// knows no phone numbers) round-trips; absent and `null` both mean "not
/// known". Unknown fields are ignored, so a newer host can add fields without
/// breaking older connectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Customer {
    /// In a record ferry sends: ferry's id of the customer. In a record a
    /// connector returns: the remote's id (the host keys links on the
    /// separate `remote-id` field, so this is informational there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Full name or company name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// E-mail address; the host matches unlinked remote customers on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Phone number as entered, ideally E.164.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Postal address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    /// Free-form string pairs, synced as a whole. `null`, for the whole
    /// map or a value, is "not known": an empty map, a value left out.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "metadata_or_null"
    )]
    pub metadata: BTreeMap<String, String>,
}

/// `metadata` as it is read: `null` is no map, and a `null` value no value.
fn metadata_or_null<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let map: Option<BTreeMap<String, Option<String>>> = Option::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .flatten()
        .filter_map(|(key, value)| Some((key, value?)))
        .collect())
}

/// A postal address, field names as Stripe's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Address {
    /// Street, PO box or company name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line1: Option<String>,
    /// Apartment, suite, unit or building.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    /// City, district, suburb, town or village.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// State, county, province or region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// ZIP or postal code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    /// Two-letter country code (ISO 3166-1 alpha-2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

impl Address {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

impl Customer {
    /// Parses canonical JSON; malformed JSON is a permanent error.
    pub fn from_json(json: &str) -> Result<Self, crate::ConnectorError> {
        Ok(serde_json::from_str(json)?)
    }

    /// Canonical JSON text.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and maps cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// The metadata keys an update's record (canonical JSON) names in its
    /// `metadata_removed` field: keys the remote held at the last sync that
    /// ferry has removed since. A remote that merges metadata, deleting a
    /// key only when told to (Stripe's: posted empty), unsets each; one
    /// that replaces the map whole has nothing to do. A field of its own,
    /// which [`Customer::from_json`] ignores as any unknown field: a
    /// connector that does not read it keeps working as before.
    pub fn removed_metadata(json: &str) -> Vec<String> {
        #[derive(Deserialize)]
        struct Removed {
            #[serde(default)]
            metadata_removed: Option<Vec<String>>,
        }
        serde_json::from_str::<Removed>(json)
            .ok()
            .and_then(|r| r.metadata_removed)
            .unwrap_or_default()
    }

    /// The fields an update's record (canonical JSON) names in its
    /// `changed_fields` list: those whose values differ from the remote's
    /// state at the last sync. A connector that sends only these leaves
    /// alone a field someone changed at the remote just before the push
    /// (its event then reaches ferry as an edit rather than being pushed
    /// over). A record without the list (a create, an update with no
    /// last synced state) names every field.
    pub fn changed_fields(json: &str) -> ChangedFields {
        #[derive(Deserialize)]
        struct Changed {
            #[serde(default)]
            changed_fields: Option<BTreeSet<String>>,
        }
        ChangedFields(
            serde_json::from_str::<Changed>(json)
                .ok()
                .and_then(|c| c.changed_fields),
        )
    }
}

/// The fields an update changes ([`Customer::changed_fields`]), named as
/// ferry's merge names them: `name`, `email`, `phone`, `address.city`
/// (each address part), `metadata.tier` (each metadata key, a key with
/// dots as is). With no list, every field counts as changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangedFields(Option<BTreeSet<String>>);

impl ChangedFields {
    /// Whether `field` (`name`, `address.city`, `metadata.tier`) is to be
    /// sent.
    pub fn field(&self, field: &str) -> bool {
        self.0.as_ref().is_none_or(|names| names.contains(field))
    }

    /// Whether any part of the address is to be sent (a remote that
    /// replaces the address whole sends all of it).
    pub fn address(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n.starts_with("address.")))
    }

    /// Whether metadata key `key` is to be sent.
    pub fn metadata(&self, key: &str) -> bool {
        self.0
            .as_ref()
            .is_none_or(|names| names.contains(&format!("metadata.{key}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_metadata_keys_are_named_beside_the_record() {
        let json = r#"{"name":"Ada","metadata":{"plan":"pro"},"metadata_removed":["old","tier"]}"#;
        assert_eq!(Customer::removed_metadata(json), ["old", "tier"]);
        let c = Customer::from_json(json).unwrap();
        assert_eq!(c.metadata.len(), 1, "the record reads as before");
        assert!(Customer::removed_metadata(r#"{"metadata_removed":null}"#).is_empty());
        assert!(Customer::removed_metadata(r#"{"name":"Ada"}"#).is_empty());
        assert!(Customer::removed_metadata("not json").is_empty());
    }

    #[test]
    fn changed_fields_are_named_beside_the_record() {
        let json = r#"{"name":"Ada","changed_fields":["email","address.city","metadata.a.b"]}"#;
        let changed = Customer::changed_fields(json);
        assert!(changed.field("email") && !changed.field("name"));
        assert!(changed.address() && changed.field("address.city"));
        assert!(changed.metadata("a.b") && !changed.metadata("a"));
        let none = Customer::changed_fields(r#"{"changed_fields":[]}"#);
        assert!(!none.field("name") && !none.address() && !none.metadata("a"));
        for every in [
            r#"{"name":"Ada"}"#,
            r#"{"changed_fields":null}"#,
            "not json",
        ] {
            let all = Customer::changed_fields(every);
            assert!(
                all.field("name") && all.address() && all.metadata("a"),
                "{every}"
            );
        }
        assert_eq!(
            Customer::from_json(json).unwrap().name.as_deref(),
            Some("Ada")
        );
    }

    #[test]
    fn round_trips_and_skips_unknown_fields() {
        let json = r#"{"id":"c1","name":"Ada","email":"ada@example.com","phone":null,
            "address":{"city":"London","country":"GB"},"metadata":{"tier":"gold"},"future":1}"#;
        let c = Customer::from_json(json).unwrap();
        assert_eq!(c.name.as_deref(), Some("Ada"));
        assert_eq!(c.phone, None);
        assert_eq!(c.address.as_ref().unwrap().city.as_deref(), Some("London"));
        assert_eq!(
            c.to_json(),
            r#"{"id":"c1","name":"Ada","email":"ada@example.com","address":{"city":"London","country":"GB"},"metadata":{"tier":"gold"}}"#
        );
        assert_eq!(Customer::from_json("{}").unwrap(), Customer::default());
        // `null` is "not known", for the map and for a value (it was an
        // error: a connector reading such a record refused it).
        assert_eq!(
            Customer::from_json(r#"{"metadata":null}"#).unwrap(),
            Customer::default()
        );
        let c = Customer::from_json(r#"{"metadata":{"tier":"gold","gone":null}}"#).unwrap();
        assert_eq!(c.metadata.len(), 1, "{c:?}");
        assert_eq!(c.metadata["tier"], "gold");
        assert!(Customer::from_json("[").is_err());
    }
}
