//! Builders and constructors over the raw WIT records, so a connector never
//! spells out a record with a dozen fields.

use crate::{
    ChangeKind, ConnectorError, Event, Manifest, Page, ParsedWebhook, PushRequest, PushResult,
    RemoteRecord, SecretSpec, SettingSpec, WebhookReply,
};

impl Manifest {
    /// Starts a manifest for connector `name` (`[a-z0-9-]+`) at `version`.
    pub fn builder(name: impl Into<String>, version: impl Into<String>) -> ManifestBuilder {
        ManifestBuilder(Manifest {
            name: name.into(),
            version: version.into(),
            description: String::new(),
            entities: Vec::new(),
            hosts: Vec::new(),
            host_settings: Vec::new(),
            settings: Vec::new(),
            secrets: Vec::new(),
            webhooks: false,
        })
    }
}

/// Builds a [`Manifest`]; start with [`Manifest::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ManifestBuilder(Manifest);

impl ManifestBuilder {
    /// One line for the operator.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.0.description = text.into();
        self
    }

    /// An entity type handled, e.g. `customer` (repeatable).
    pub fn entity(mut self, entity: impl Into<String>) -> Self {
        self.0.entities.push(entity.into());
        self
    }

    /// A host the connector calls, e.g. `api.stripe.com` (repeatable).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.0.hosts.push(host.into());
        self
    }

    /// A setting (repeatable).
    pub fn setting(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        default: Option<&str>,
        required: bool,
    ) -> Self {
        self.0.settings.push(SettingSpec {
            name: name.into(),
            description: description.into(),
            default: default.map(str::to_owned),
            required,
        });
        self
    }

    /// A setting whose value is a base URL whose host counts as declared, so
    /// an operator can point the connector at a sandbox or a fake.
    pub fn base_url_setting(
        self,
        name: impl Into<String>,
        description: impl Into<String>,
        default: &str,
    ) -> Self {
        let name = name.into();
        let mut this = self.setting(name.clone(), description, Some(default), false);
        this.0.host_settings.push(name);
        this
    }

    /// A secret named in placeholders and HMACs (repeatable).
    pub fn secret(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        required: bool,
    ) -> Self {
        self.0.secrets.push(SecretSpec {
            name: name.into(),
            description: description.into(),
            required,
        });
        self
    }

    /// Declares that `verify-webhook` and `parse-webhook` are implemented.
    pub fn webhooks(mut self) -> Self {
        self.0.webhooks = true;
        self
    }

    /// The finished manifest.
    pub fn build(self) -> Manifest {
        self.0
    }
}

impl PushRequest {
    /// The linked remote id an update or delete needs; a missing one is
    /// [`ConnectorError::Permanent`] naming `system` (e.g. "Stripe").
    pub fn linked_remote_id(&self, system: &str) -> Result<&str, ConnectorError> {
        self.remote_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                ConnectorError::permanent(format!(
                    "customer {} has no {system} id to update or delete",
                    self.local_id
                ))
            })
    }
}

/// `Ok` if `entity` is `expected`; otherwise [`ConnectorError::Unsupported`]
/// naming the `connector`, so the host never retries it.
pub fn ensure_entity(entity: &str, expected: &str, connector: &str) -> Result<(), ConnectorError> {
    if entity == expected {
        Ok(())
    } else {
        Err(ConnectorError::unsupported(format!(
            "the {connector} connector does not handle `{entity}`"
        )))
    }
}

impl PushResult {
    /// The remote id after the push, with no record returned.
    pub fn new(remote_id: impl Into<String>) -> Self {
        Self {
            remote_id: remote_id.into(),
            record: None,
        }
    }

    /// Attaches the remote's state after the write, in canonical JSON.
    #[must_use]
    pub fn with_record(mut self, record: impl Into<String>) -> Self {
        self.record = Some(record.into());
        self
    }
}

impl Event {
    /// A created-or-updated event carrying the record's new state, or
    /// `None` for a thin event: ferry then calls `fetch` for the record as
    /// the remote holds it when the event is applied.
    pub fn upsert(
        id: impl Into<String>,
        entity: impl Into<String>,
        remote_id: impl Into<String>,
        occurred_at_ms: i64,
        record: Option<String>,
    ) -> Self {
        Self {
            id: id.into(),
            entity: entity.into(),
            kind: ChangeKind::Upsert,
            remote_id: remote_id.into(),
            occurred_at_ms,
            record,
            origin_key: None,
            remote_type: String::new(),
        }
    }

    /// A deletion event.
    pub fn delete(
        id: impl Into<String>,
        entity: impl Into<String>,
        remote_id: impl Into<String>,
        occurred_at_ms: i64,
    ) -> Self {
        Self {
            kind: ChangeKind::Delete,
            ..Self::upsert(id, entity, remote_id, occurred_at_ms, None)
        }
    }

    /// The remote's own event type, for logs (`customer.updated`).
    #[must_use]
    pub fn with_remote_type(mut self, remote_type: impl Into<String>) -> Self {
        self.remote_type = remote_type.into();
        self
    }

    /// The idempotency key of the request that caused the event, so the host
    /// recognises the echo of its own push.
    #[must_use]
    pub fn with_origin_key(mut self, key: Option<String>) -> Self {
        self.origin_key = key;
        self
    }
}

impl ParsedWebhook {
    /// Events with the host's default `200` reply.
    pub fn events(events: Vec<Event>) -> Self {
        Self {
            events,
            reply: None,
        }
    }

    /// A delivery that reports nothing ferry syncs (an ignored event type).
    pub fn ignored() -> Self {
        Self::events(Vec::new())
    }

    /// Answers the sender with `body` once the events are stored.
    #[must_use]
    pub fn with_reply(mut self, content_type: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        self.reply = Some(WebhookReply {
            content_type: content_type.into(),
            body: body.into(),
        });
        self
    }
}

impl RemoteRecord {
    /// A remote record in canonical JSON.
    pub fn new(remote_id: impl Into<String>, record: impl Into<String>) -> Self {
        Self {
            remote_id: remote_id.into(),
            record: record.into(),
            updated_at_ms: None,
        }
    }

    /// When the remote last changed it, ms since the Unix epoch.
    /// Informational: ferry orders nothing by it today (a reconciliation
    /// dates what it lists by the listing's time).
    #[must_use]
    pub fn with_updated_at_ms(mut self, ms: i64) -> Self {
        self.updated_at_ms = Some(ms);
        self
    }
}

impl Page {
    /// A page of records; `next_cursor` is `None` on the last page.
    pub fn new(records: Vec<RemoteRecord>, next_cursor: Option<String>) -> Self {
        Self {
            records,
            next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_builder_declares_base_url_hosts() {
        let m = Manifest::builder("acme", "1.0.0")
            .description("d")
            .entity("customer")
            .host("api.acme.example")
            .base_url_setting("api_base", "API base URL", "https://api.acme.example")
            .secret("api_key", "key", true)
            .webhooks()
            .build();
        assert_eq!(m.host_settings, vec!["api_base".to_owned()]);
        assert_eq!(
            m.settings[0].default.as_deref(),
            Some("https://api.acme.example")
        );
        assert!(m.webhooks);
    }

    #[test]
    fn event_constructors() {
        let e = Event::delete("evt", "customer", "cus", 5).with_remote_type("customer.deleted");
        assert_eq!(e.kind, ChangeKind::Delete);
        assert_eq!(e.record, None);
        assert_eq!(e.remote_type, "customer.deleted");
    }
}
