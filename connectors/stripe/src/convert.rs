//! Conversions between Stripe's customer object and ferry's canonical
//! customer, and the form encoding Stripe expects for writes.

use std::collections::BTreeMap;

use ferry_sdk::{Address, ChangedFields, Customer};
use serde::Deserialize;

/// The metadata key holding ferry's id of the customer. Kept out of the
/// canonical record: it is bookkeeping, not customer data.
pub(crate) const FERRY_ID_KEY: &str = "ferry_id";

/// The parts of a Stripe customer ferry syncs.
#[derive(Debug, Deserialize)]
pub(crate) struct StripeCustomer {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) deleted: bool,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    // Not `Option<StripeAddress>`: a fake or an old API version may send a
    // non-object here, which must not fail the whole record.
    #[serde(default)]
    address: Option<serde_json::Value>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
struct StripeAddress {
    #[serde(default)]
    line1: Option<String>,
    #[serde(default)]
    line2: Option<String>,
    #[serde(default)]
    city: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    postal_code: Option<String>,
    #[serde(default)]
    country: Option<String>,
}

/// Stripe has no "empty" value distinct from unset: both become `None`.
fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

pub(crate) fn from_stripe(c: StripeCustomer) -> Customer {
    let address = c
        .address
        .and_then(|v| serde_json::from_value::<StripeAddress>(v).ok())
        .map(|a| Address {
            line1: non_empty(a.line1),
            line2: non_empty(a.line2),
            city: non_empty(a.city),
            state: non_empty(a.state),
            postal_code: non_empty(a.postal_code),
            country: non_empty(a.country),
        })
        .filter(|a| !a.is_empty());
    let metadata = c
        .metadata
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != FERRY_ID_KEY)
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k, s)),
            serde_json::Value::Null => None,
            other => Some((k, other.to_string())),
        })
        .collect();
    Customer {
        id: Some(c.id),
        name: non_empty(c.name),
        email: non_empty(c.email),
        phone: non_empty(c.phone),
        address,
        metadata,
    }
}

/// What an update changes: the metadata keys ferry removed since the last
/// sync ([`Customer::removed_metadata`]) and the fields that differ from
/// the remote's state then ([`Customer::changed_fields`]).
pub(crate) struct Update {
    pub(crate) cleared: Vec<String>,
    pub(crate) changed: ChangedFields,
}

impl Update {
    /// The update `record` (canonical JSON, as pushed) asks for.
    pub(crate) fn of(record: &str) -> Self {
        Self {
            cleared: Customer::removed_metadata(record),
            changed: Customer::changed_fields(record),
        }
    }
}

/// Form pairs for `POST /v1/customers[/{id}]`: a create's (`update`
/// `None`), or an update's. An update sends only the fields ferry changed
/// since the last sync: one someone changed in the dashboard just before
/// the push stays, and its event reaches ferry as an edit (sent whole, it
/// was pushed over, and the event read as the push's echo). The address
/// is sent whole when any part changed (Stripe's `address` is one value).
/// On update an unset field is sent empty, which Stripe documents as
/// "unset", so the remote ends up equal to ferry's record rather than
/// keeping stale values. Stripe merges metadata: a key is unset only when
/// posted empty, which an update does for the keys ferry removed since the
/// last sync; other keys absent locally are left alone (another
/// integration's, not yet seen by ferry).
pub(crate) fn customer_form(
    c: &Customer,
    local_id: &str,
    update: Option<&Update>,
) -> Vec<(String, String)> {
    let sends = |field: &str| update.is_none_or(|u| u.changed.field(field));
    let mut form = Vec::new();
    let mut field = |name: &str, value: &Option<String>| match value {
        _ if !sends(name) => {}
        Some(v) => form.push((name.to_owned(), v.clone())),
        None if update.is_some() => form.push((name.to_owned(), String::new())),
        None => {}
    };
    field("name", &c.name);
    field("email", &c.email);
    field("phone", &c.phone);
    match &c.address {
        _ if update.is_some_and(|u| !u.changed.address()) => {}
        Some(a) => {
            let parts = [
                ("line1", &a.line1),
                ("line2", &a.line2),
                ("city", &a.city),
                ("state", &a.state),
                ("postal_code", &a.postal_code),
                ("country", &a.country),
            ];
            for (key, value) in parts {
                match value {
                    Some(v) => form.push((format!("address[{key}]"), v.clone())),
                    // Unset a line ferry no longer has, as for top-level fields.
                    None if update.is_some() => {
                        form.push((format!("address[{key}]"), String::new()));
                    }
                    None => {}
                }
            }
        }
        None if update.is_some() => form.push(("address".to_owned(), String::new())),
        None => {}
    }
    for (k, v) in &c.metadata {
        if k != FERRY_ID_KEY && update.is_none_or(|u| u.changed.metadata(k)) {
            form.push((format!("metadata[{k}]"), v.clone()));
        }
    }
    for k in update.iter().flat_map(|u| &u.cleared) {
        if k != FERRY_ID_KEY && !c.metadata.contains_key(k) {
            form.push((format!("metadata[{k}]"), String::new()));
        }
    }
    form.push((format!("metadata[{FERRY_ID_KEY}]"), local_id.to_owned()));
    form
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_customer_to_canonical() {
        let json = r#"{"id":"cus_1","object":"customer","name":"Ada","email":"",
            "phone":null,"address":{"line1":"1 Road","line2":null,"city":"London",
            "state":"","postal_code":"N1","country":"GB"},
            "metadata":{"ferry_id":"f1","tier":"gold"}}"#;
        let c = from_stripe(serde_json::from_str(json).unwrap());
        assert_eq!(c.id.as_deref(), Some("cus_1"));
        assert_eq!(c.email, None);
        let a = c.address.unwrap();
        assert_eq!(a.city.as_deref(), Some("London"));
        assert_eq!(a.state, None);
        assert_eq!(c.metadata.len(), 1);
        assert_eq!(c.metadata["tier"], "gold");
    }

    #[test]
    fn odd_address_values_do_not_fail_the_record() {
        let c = from_stripe(serde_json::from_str(r#"{"id":"cus_1","address":""}"#).unwrap());
        assert_eq!(c.address, None);
    }

    #[test]
    fn update_form_unsets_missing_fields() {
        let c = Customer {
            name: Some("Ada".into()),
            ..Customer::default()
        };
        let create = customer_form(&c, "f1", None);
        assert_eq!(
            create,
            vec![
                ("name".to_owned(), "Ada".to_owned()),
                ("metadata[ferry_id]".to_owned(), "f1".to_owned())
            ]
        );
        let update = customer_form(
            &c,
            "f1",
            Some(&Update::of(r#"{"metadata_removed":["gone"]}"#)),
        );
        assert!(update.contains(&("email".to_owned(), String::new())));
        assert!(update.contains(&("address".to_owned(), String::new())));
        assert!(update.contains(&("metadata[gone]".to_owned(), String::new())));

        let with_city = Customer {
            address: Some(Address {
                city: Some("Paris".into()),
                ..Address::default()
            }),
            ..Customer::default()
        };
        let create = customer_form(&with_city, "f1", None);
        assert!(create.contains(&("address[city]".to_owned(), "Paris".to_owned())));
        assert!(!create.iter().any(|(k, _)| k == "address[line1]"));
        let update = customer_form(&with_city, "f1", Some(&Update::of("{}")));
        assert!(update.contains(&("address[line1]".to_owned(), String::new())));
    }

    #[test]
    fn update_form_sends_only_what_changed() {
        let c = Customer {
            name: Some("Ada".into()),
            email: None,
            phone: Some("+4930123".into()),
            address: Some(Address {
                city: Some("Paris".into()),
                ..Address::default()
            }),
            metadata: [("plan", "pro"), ("tier", "gold")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            ..Customer::default()
        };
        let record = r#"{"changed_fields":["email","metadata.plan","metadata.old"],
            "metadata_removed":["old"]}"#;
        let update = customer_form(&c, "f1", Some(&Update::of(record)));
        assert_eq!(
            update,
            [
                ("email", ""),
                ("metadata[plan]", "pro"),
                ("metadata[old]", ""),
                ("metadata[ferry_id]", "f1")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        let moved = customer_form(
            &c,
            "f1",
            Some(&Update::of(r#"{"changed_fields":["address.line1"]}"#)),
        );
        assert!(moved.contains(&("address[city]".to_owned(), "Paris".to_owned())));
        assert!(moved.contains(&("address[line1]".to_owned(), String::new())));
        assert!(!moved.iter().any(|(k, _)| k == "name" || k == "phone"));
    }
}
