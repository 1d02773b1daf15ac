//! The Salesforce connector: syncs ferry customers with Salesforce Contacts
//! (or Accounts, or a custom object) through the REST API, authenticated by
//! the OAuth client-credentials flow the host runs for it, and turns
//! Outbound Messages (SOAP) into ferry events.

mod convert;
mod outbound;

use ferry_sdk::http::{Request, Response};
use ferry_sdk::json::{Map, Value};
use ferry_sdk::oauth::{self, ClientCredentials, Token};
use ferry_sdk::{
    settings, Connector, ConnectorError, Customer, Event, Manifest, Operation, Page, ParsedWebhook,
    PushRequest, PushResult, RemoteRecord, WebhookRequest,
};
use serde::Deserialize;

use crate::convert::{is_api_name, parse_datetime_ms, FieldMap};

const ENTITY: &str = "customer";
/// The name the host caches the access token under.
const TOKEN_NAME: &str = "salesforce";
const DEFAULT_API_VERSION: &str = "62.0";
const DEFAULT_OBJECT: &str = "Contact";
const DEFAULT_CLIENT_NAME: &str = "ferry";
/// Salesforce clamps `batchSize` to this range; a page holds at most
/// `MAX_BATCH` records.
const MIN_BATCH: u32 = 200;
/// How long the org's daily API allowance (`TotalRequests`) is waited out
/// between probes.
const DAILY_LIMIT_WAIT_MS: u64 = 60 * 60 * 1000;
/// How long a connector waits between probes of an org read-only for a
/// planned maintenance, when Salesforce gives no `Retry-After`.
const MAINTENANCE_WAIT_MS: u64 = 60 * 1000;
const MAX_BATCH: u32 = 2000;

struct Salesforce;

impl Connector for Salesforce {
    fn manifest() -> Manifest {
        let mut manifest = Manifest::builder("salesforce", env!("CARGO_PKG_VERSION"))
            .description("Salesforce Contacts (or any object): push, fetch, list and Outbound Messages")
            .entity(ENTITY)
            .setting(
                "login_url",
                "The org's My Domain URL, e.g. https://acme.my.salesforce.com (the token endpoint's host)",
                None,
                true,
            )
            .setting(
                "api_version",
                "REST API version, e.g. 62.0",
                Some(DEFAULT_API_VERSION),
                false,
            )
            .setting(
                "object",
                "The sObject customers sync with: Contact, Account or a custom object",
                Some(DEFAULT_OBJECT),
                false,
            )
            .setting(
                "organization_id",
                "The org's id (15 or 18 characters); Outbound Messages from any other org are refused",
                None,
                false,
            )
            .setting(
                "client_name",
                "Sent as `Sforce-Call-Options: client=NAME` on every data API request",
                Some(DEFAULT_CLIENT_NAME),
                false,
            )
            .setting(
                "field_map",
                r#"JSON object of canonical paths to fields, over the Contact defaults, e.g. {"metadata.tier":"Tier__c"}"#,
                None,
                false,
            )
            .setting(
                "instance_url",
                "Base URL of the org's API; overrides the token response's instance_url",
                None,
                false,
            )
            .setting(
                "external_id_field",
                "An external id field (e.g. Ferry_Id__c): creates become upserts on ferry's id, so a retry never duplicates",
                None,
                false,
            )
            .setting(
                "fetch_records",
                "When ferry reads a record from the API instead of taking an Outbound Message's fields: `always` (or `true`: a message only names the records that changed, so a forged one cannot write a record's content), `incomplete` (or `false`: when the message lacks a mapped field, which may be empty or not sent, and cannot be told apart), `never` (a missing field is read as cleared: only for a message set up to send every mapped field)",
                Some("always"),
                false,
            )
            .secret("client_id", "Consumer key of the connected app", true)
            .secret("client_secret", "Consumer secret of the connected app", true)
            .webhooks()
            .build();
        // Both are base URLs whose hosts the operator chooses; the builder's
        // `base_url_setting` wants a default, which neither has.
        manifest.host_settings = vec!["login_url".to_owned(), "instance_url".to_owned()];
        manifest
    }

    fn verify_webhook(req: WebhookRequest) -> Result<(), ConnectorError> {
        // Outbound Messages are not signed: the org id is the check (see the
        // README for what else protects the endpoint). A body that is no
        // message names no org: unverified, not a message ferry failed to
        // read (which an operator is told to look into).
        let message = outbound::parse(&req.body).map_err(|e| match e {
            ConnectorError::Permanent(why) => ConnectorError::invalid_signature(why),
            other => other,
        })?;
        let expected = settings::get("organization_id")
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| {
                ConnectorError::invalid_signature(
                    "setting `organization_id` is not set, so no outbound message can be verified",
                )
            })?;
        match message.organization_id.as_deref() {
            Some(got) if outbound::same_org(got, &expected) => Ok(()),
            Some(got) => Err(ConnectorError::invalid_signature(format!(
                "outbound message from organization {got}, not the configured one"
            ))),
            None => Err(ConnectorError::invalid_signature(
                "outbound message has no OrganizationId",
            )),
        }
    }

    fn parse_webhook(req: WebhookRequest) -> Result<ParsedWebhook, ConnectorError> {
        let config = Config::load()?;
        let message = outbound::parse(&req.body)?;
        if message.skipped > 0 {
            ferry_sdk::log::warn(&format!(
                "{} notification(s) named no record (deleted before delivery): \
                 acknowledged without an event",
                message.skipped
            ));
        }
        let remote_type = format!("outbound_message.{}", config.object);
        let (notifications, other): (Vec<_>, Vec<_>) = message
            .notifications
            .into_iter()
            .partition(|n| n.object.eq_ignore_ascii_case(&config.object));
        let other = other.len();
        if other > 0 {
            ferry_sdk::log::warn(&format!(
                "{other} notification(s) of another object than `{}` (the outbound \
                 message's object, or the `object` setting, is wrong): acknowledged \
                 without an event",
                config.object
            ));
        }
        let events = notifications
            .into_iter()
            .map(|n| {
                let when = ["LastModifiedDate", "SystemModstamp"]
                    .iter()
                    .find_map(|f| n.fields.get(*f).and_then(Value::as_str))
                    .and_then(parse_datetime_ms)
                    .unwrap_or(0);
                // The event's id pairs the notification's with its record's:
                // Salesforce counts notification ids up, so one forged
                // ahead with a guessed id took a real notification's
                // place in the inbox (the real one was then acknowledged
                // as already received, and dropped). And with the record's
                // date, when the message sends it: a notification sent
                // again carries the record as it is by then ("only the
                // latest data is delivered", Salesforce's "Understanding
                // Notifications"), so one redelivered after a later edit
                // (its first Ack lost) is that edit, which an id of the
                // notification alone dropped as already received, and no
                // other notification may carry (a rule that fires once).
                // Salesforce dates in whole seconds, so an edit of the same
                // second kept the id: a digest of the fields sent tells
                // the two apart, and leaves a redelivery of the same
                // message (its Ack lost) one event.
                let digest = fields_digest(&n.fields);
                let id = if when > 0 {
                    format!("{}:{}:{when}:{digest}", n.id, n.record_id)
                } else {
                    format!("{}:{}:{digest}", n.id, n.record_id)
                };
                // A record deleted before the message went out comes with
                // no data (Salesforce Help, "Considerations for Outbound
                // Messages"): read as a record whose every field was cleared,
                // it wiped the customer. A trigger instead: ferry fetches
                // the record, and finds it gone.
                let no_data = n.fields.keys().all(|k| k.eq_ignore_ascii_case("Id"));
                // A message leaves out empty fields and those it is not set
                // up to send alike: read as cleared, a mapped field the
                // message was never set to carry wiped the customer's value
                // (and every other connector's). Unless the operator says
                // the message sends every mapped field, the org is asked.
                let incomplete = config.fetch_records == Fetch::Incomplete
                    && config.fields.missing_from(&n.fields).is_some();
                if config.fetch_records == Fetch::Always || no_data {
                    // A trigger: ferry fetches what the org holds now, so the
                    // message's own date and fields are not used, and the
                    // triggers are ordered as they arrive: undated (0), so
                    // ferry dates it on arrival by the one clock its
                    // replicas share (a replica's own clock, ahead, made
                    // the next complete message look stale).
                    return Event::upsert(id, ENTITY, n.record_id, 0, None)
                        .with_remote_type(remote_type.clone());
                }
                // A message without its date (the Outbound Message not set
                // to send `LastModifiedDate`) cannot be ordered: Salesforce
                // redelivers a message it got no Ack for, later, so an
                // older edit dated on arrival came back over a newer one.
                // A trigger: what the org holds now is applied. Under
                // `fetch_records=never` the message is all there is.
                let undated = when == 0 && config.fetch_records != Fetch::Never;
                if incomplete || undated {
                    // A trigger dated as the message is, as the complete
                    // messages of the same record are: dated on arrival
                    // instead, a later edit's complete message (its date in
                    // whole seconds, earlier than the arrival of the one
                    // before) was skipped as stale.
                    return Event::upsert(id, ENTITY, n.record_id, when, None)
                        .with_remote_type(remote_type.clone());
                }
                let record = config
                    .fields
                    .customer_from(&n.record_id, &n.fields)
                    .to_json();
                Event::upsert(id, ENTITY, n.record_id, when, Some(record))
                    .with_remote_type(remote_type.clone())
            })
            .collect();
        Ok(ParsedWebhook::events(events).with_reply(
            "text/xml; charset=utf-8",
            outbound::ACK_REPLY.as_bytes().to_vec(),
        ))
    }

    fn push(req: PushRequest) -> Result<PushResult, ConnectorError> {
        ferry_sdk::ensure_entity(&req.entity, ENTITY, "salesforce")?;
        let config = Config::load()?;
        push(&config, &req).map_err(|error| config.record_gone(error))
    }

    fn fetch(entity: String, remote_id: String) -> Result<RemoteRecord, ConnectorError> {
        ferry_sdk::ensure_entity(&entity, ENTITY, "salesforce")?;
        let config = Config::load()?;
        fetch(&config, &remote_id)
            .map_err(|error| config.record_gone(error))
            .map_err(|error| config.not_merged(error, &remote_id))
            .map_err(not_shown_deleted)
    }

    /// Keyset paging: `SELECT … WHERE Id > '<cursor>' ORDER BY Id LIMIT
    /// <limit>`, so a page never holds more than `limit` records and a
    /// cursor (the last Id) never expires, unlike a query locator. Salesforce
    /// may still split one answer into batches; those are followed with
    /// `nextRecordsUrl` within the call.
    fn list(entity: String, cursor: Option<String>, limit: u32) -> Result<Page, ConnectorError> {
        ferry_sdk::ensure_entity(&entity, ENTITY, "salesforce")?;
        let config = Config::load()?;
        if let Some(after) = &cursor {
            if !is_record_id(after) {
                return Err(ConnectorError::permanent(format!(
                    "cursor `{after}` is not a Salesforce record id"
                )));
            }
        }
        let limit = limit.clamp(1, MAX_BATCH);
        let batch = format!("batchSize={}", limit.max(MIN_BATCH));
        let soql = config.list_query(cursor.as_deref(), limit);
        let mut next: Option<String> = None;
        let mut records = Vec::new();
        loop {
            let resp = config.call(|base, token| {
                let req = match &next {
                    Some(path) => Request::get(format!("{base}{path}")),
                    None => Request::get(format!("{}/query", config.data_url(base)))
                        .query(&[("q", soql.as_str())])?,
                };
                Ok(req
                    .bearer_token(token)
                    .header("sforce-query-options", batch.as_str()))
            })?;
            let result: QueryResult = resp.json()?;
            for row in &result.records {
                records.push(config.remote_record(row)?);
            }
            if result.done {
                break;
            }
            // Salesforce names the next batch whenever it is not done: an
            // answer without one ended the page short, and a listing that
            // ends early reports every record after it as missing.
            match result.next_records_url {
                Some(path) if path.starts_with("/services/data/") => next = Some(path),
                other => {
                    return Err(ConnectorError::retryable(format!(
                        "query answer not done, with no usable nextRecordsUrl ({other:?})"
                    )))
                }
            }
        }
        records.truncate(limit as usize);
        let next_cursor = (records.len() == limit as usize)
            .then(|| records.last().map(|r| r.remote_id.clone()))
            .flatten();
        Ok(Page::new(records, next_cursor))
    }
}

/// A push with its configuration loaded.
fn push(config: &Config, req: &PushRequest) -> Result<PushResult, ConnectorError> {
    match req.operation {
        Operation::Create => {
            let customer = Customer::from_json(&req.record)?;
            // An upsert may update a record its external id already
            // names (one restored from the Recycle Bin, one a lost
            // answer made): it sends each field, unset ones as null, as
            // an update does, so the record ferry keeps as the base is
            // the one in Salesforce.
            let upsert = config.external_id_field.is_some();
            let fields = config.fields.to_sobject(&customer, upsert);
            let body = Value::Object(fields.clone());
            let id = match &config.external_id_field {
                Some(field) => config.upsert(field, &req.local_id, &body)?,
                None => config.create(&body)?,
            };
            Ok(written(config, id, &fields))
        }
        Operation::Update => {
            let id = req.linked_remote_id("Salesforce")?;
            let customer = Customer::from_json(&req.record)?;
            let mut fields = config.fields.to_sobject(&customer, true);
            // Only the fields ferry changed since the last sync: one
            // someone edited in Salesforce just before the push stays,
            // and its Outbound Message reaches ferry as an edit.
            let changed = Customer::changed_fields(&req.record);
            let sent = config.fields.changed(&customer, &changed);
            let mut body = fields.clone();
            body.retain(|field, _| sent.contains(&field.as_str()));
            let kept = match changed.field("name") {
                true => config.name_parts_to_keep(id, customer.name.as_deref())?,
                false => None,
            };
            for (field, value) in kept.into_iter().flatten() {
                body.remove(&field);
                fields.insert(field, value);
            }
            // A nameless customer's new email makes a new stand-in name;
            // a name someone typed in Salesforce since (its message not
            // yet applied, or never sent) is left as it is, not
            // overwritten by the stand-in. The fields ferry keeps as the
            // base stay the stand-in's, so that name still reaches ferry
            // as Salesforce's edit.
            if customer.name.is_none()
                && !changed.field("name")
                && changed.field("email")
                && config.holds_a_typed_name(id)?
            {
                for field in config.fields.name_fields() {
                    body.remove(field);
                }
            }
            // Only fields the mapping does not hold changed: nothing
            // to write (an empty PATCH would still fire the org's
            // triggers and Outbound Messages). The external id goes
            // with a write (a record linked before it was set gains it
            // on its next change), and is never a write of its own.
            if let Some(field) = &config.external_id_field {
                fields.insert(field.clone(), Value::String(req.local_id.clone()));
                if !body.is_empty() {
                    body.insert(field.clone(), Value::String(req.local_id.clone()));
                }
            }
            if body.is_empty() {
                return Ok(written(config, id.to_owned(), &fields));
            }
            let patch = |body: &Map<String, Value>| {
                config.call(|base, token| {
                    Request::patch(config.record_url(base, id))
                        .bearer_token(token)
                        .json(body)
                })
            };
            match (patch(&body), &config.external_id_field) {
                // Another record holds the external id (the Contact this
                // customer was linked to before a merge or relink, in the
                // Recycle Bin or alive): the stamp is a convenience, the
                // change is the point. Refused for good, every later
                // change of the customer was dead-lettered.
                (Err(ConnectorError::Permanent(message)), Some(field))
                    if duplicate_value_of(&message, field) =>
                {
                    eprintln!(
                        "record {id}: {field} = {} is held by another record; the change goes \
                         without it ({message})",
                        req.local_id
                    );
                    body.remove(field);
                    fields.remove(field);
                    patch(&body)?;
                }
                (sent, _) => {
                    sent?;
                }
            }
            Ok(written(config, id.to_owned(), &fields))
        }
        Operation::Delete => {
            let id = req.linked_remote_id("Salesforce")?;
            config.call(|base, token| {
                Ok(Request::delete(config.record_url(base, id)).bearer_token(token))
            })?;
            Ok(PushResult::new(id))
        }
    }
}

/// Whether Salesforce refused a write as a `DUPLICATE_VALUE` of `field`
/// (the unique external id). Salesforce names the field as the org spells
/// it; the setting may spell it otherwise (API names ignore case).
fn duplicate_value_of(message: &str, field: &str) -> bool {
    let (message, field) = (message.to_ascii_lowercase(), field.to_ascii_lowercase());
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    // The whole name: `Legacy_Ferry_Id__c` is another field.
    message.contains("duplicate_value")
        && message.match_indices(&field).any(|(at, _)| {
            !message[..at].ends_with(is_name) && !message[at + field.len()..].starts_with(is_name)
        })
}

/// A record read with its configuration loaded.
fn fetch(config: &Config, remote_id: &str) -> Result<RemoteRecord, ConnectorError> {
    // The mapped fields by name, as the listing asks for them: the
    // whole record leaves out a field the integration user may not
    // see (field-level security), which read as cleared and cleared
    // it in ferry and every other system; named, Salesforce refuses
    // it (`INVALID_FIELD`, a dead letter that says so).
    let row = config.mapped_fields_of(remote_id)?;
    config.remote_record(&row)
}

/// A read's 404, unless Salesforce said the record is deleted
/// (`ENTITY_IS_DELETED`: in the Recycle Bin). A plain `NOT_FOUND` for an
/// object the org knows is also what the integration user gets for a
/// record a sharing change hides from it: read as gone, a reconciliation's
/// orphan (the listing missed the record for the same reason) deleted the
/// customer and fanned the delete out. A record purged from the Recycle
/// Bin (after 15 days) answers the same, and is then a dead letter for a
/// person, not a delete; so is a 404 without Salesforce's own error (a
/// proxy's page).
fn not_shown_deleted(error: ConnectorError) -> ConnectorError {
    match error {
        ConnectorError::NotFound(message) if !message.contains("HTTP 404: ENTITY_IS_DELETED: ") => {
            ConnectorError::permanent(format!(
                "{message}; Salesforce answers so for a record purged from the Recycle Bin \
                 and for one the integration user may not see (sharing) alike, and only a \
                 deleted record's `ENTITY_IS_DELETED` is taken as deleted: nothing was \
                 changed in ferry (if the record was deleted, delete the customer through \
                 ferry's API; if it is hidden, let the integration user see it again)"
            ))
        }
        other => other,
    }
}

/// The push's result with what Salesforce now holds in the mapped fields
/// (what was written, read back through the mapping), so the host's
/// last-synced snapshot is exactly what a later Outbound Message carries.
fn written(config: &Config, id: String, fields: &Map<String, Value>) -> PushResult {
    let record = config.fields.customer_from(&id, fields).to_json();
    PushResult::new(id).with_record(record)
}

/// Setting `name`'s URL, which must name a host only: a path pasted with
/// it (`…/services/data/v62.0`) doubled every request's, and Salesforce
/// answers a wrong path with the 404 `NOT_FOUND` of a missing record, so
/// every delete counted as done.
fn origin(name: &str, url: &str) -> Result<String, ConnectorError> {
    let url = url.trim().trim_end_matches('/');
    let host = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match host {
        Some(host) if !host.is_empty() && !host.contains(['/', '?', '#']) => Ok(url.to_owned()),
        _ => Err(ConnectorError::permanent(format!(
            "setting `{name}`: `{url}` is not a URL of a host only, such as https://acme.my.salesforce.com"
        ))),
    }
}

/// Whether `id` looks like a Salesforce record id (15 or 18 alphanumerics),
/// so it can go into SOQL as is.
fn is_record_id(id: &str) -> bool {
    matches!(id.len(), 15 | 18) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

ferry_sdk::export_connector!(Salesforce);

/// A SOQL query's answer (one page).
#[derive(Deserialize)]
struct QueryResult {
    // Always in a query's answer: one without it (a proxy's `{}`, a
    // misrouted host) is not taken for a complete, empty listing, which
    // would make every link look orphaned.
    #[serde(default)]
    done: bool,
    #[serde(default, rename = "nextRecordsUrl")]
    next_records_url: Option<String>,
    #[serde(default)]
    records: Vec<Map<String, Value>>,
}

/// The answer to a create or an upsert.
#[derive(Deserialize)]
struct SaveResult {
    id: String,
}

/// The settings of one call, read and checked once.
struct Config {
    login_url: String,
    instance_url: Option<String>,
    api_version: String,
    object: String,
    client_name: String,
    external_id_field: Option<String>,
    fetch_records: Fetch,
    fields: FieldMap,
}

/// When an Outbound Message's record is read from the API instead of taken
/// from the message (setting `fetch_records`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// Every message is a trigger.
    Always,
    /// A message that lacks a mapped field is a trigger.
    Incomplete,
    /// The message's fields are the record; a missing one was cleared.
    Never,
}

impl Config {
    fn load() -> Result<Self, ConnectorError> {
        let login_url = origin("login_url", &settings::require("login_url")?)?;
        let instance_url = match settings::get("instance_url") {
            Some(url) if !url.trim().is_empty() => Some(origin("instance_url", &url)?),
            _ => None,
        };
        let api_version = setting_or("api_version", DEFAULT_API_VERSION);
        let api_version = api_version
            .strip_prefix(['v', 'V'])
            .unwrap_or(&api_version)
            .to_owned();
        let valid_version = api_version.split_once('.').is_some_and(|(major, minor)| {
            [major, minor]
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        });
        if !valid_version {
            return Err(ConnectorError::permanent(format!(
                "setting `api_version`: `{api_version}` is not a version such as 62.0"
            )));
        }
        let object = setting_or("object", DEFAULT_OBJECT);
        checked_name("object", &object)?;
        let external_id_field = settings::get("external_id_field")
            .map(|f| f.trim().to_owned())
            .filter(|f| !f.is_empty());
        if let Some(field) = &external_id_field {
            checked_name("external_id_field", field)?;
        }
        let fetch_records = match setting_or("fetch_records", "always").as_str() {
            "always" | "true" => Fetch::Always,
            "incomplete" | "false" => Fetch::Incomplete,
            "never" => Fetch::Never,
            other => {
                return Err(ConnectorError::permanent(format!(
                    "setting `fetch_records`: `{other}` is none of always, incomplete, never"
                )))
            }
        };
        Ok(Self {
            fetch_records,
            login_url,
            instance_url,
            api_version,
            object,
            client_name: setting_or("client_name", DEFAULT_CLIENT_NAME),
            external_id_field,
            fields: FieldMap::with_overrides(settings::get("field_map").as_deref())?,
        })
    }

    fn grant(&self) -> ClientCredentials {
        ClientCredentials::new(
            format!("{}/services/oauth2/token", self.login_url),
            "client_id",
            "client_secret",
        )
    }

    /// Where the org's API lives: the setting, else what the token says.
    fn base_url(&self, token: &Token) -> Result<String, ConnectorError> {
        self.instance_url
            .clone()
            .or_else(|| {
                token
                    .field("instance_url")
                    .map(|u| u.trim_end_matches('/').to_owned())
            })
            .ok_or_else(|| {
                ConnectorError::permanent(
                    "the token response has no instance_url; set the `instance_url` setting",
                )
            })
    }

    fn data_url(&self, base: &str) -> String {
        format!("{base}/services/data/v{}", self.api_version)
    }

    /// Reads the record's name parts before an update, and returns them
    /// when they already make up `name` (see
    /// [`FieldMap::name_parts_to_keep`]); one more request, made only when
    /// the mapping splits the name and the customer has one.
    fn name_parts_to_keep(
        &self,
        id: &str,
        name: Option<&str>,
    ) -> Result<Option<Map<String, Value>>, ConnectorError> {
        let parts = self.fields.name_part_fields();
        if parts.is_empty() || name.is_none() {
            return Ok(None);
        }
        let selected = parts.join(",");
        let resp = self.call(|base, token| {
            Ok(Request::get(self.record_url(base, id))
                .query(&[("fields", selected.as_str())])?
                .bearer_token(token))
        })?;
        let current: Map<String, Value> = resp.json()?;
        Ok(self.fields.name_parts_to_keep(&current, name))
    }

    /// Whether record `id` holds a name someone typed (not empty, not a
    /// stand-in): one more request, made only when a nameless customer's
    /// email changed.
    fn holds_a_typed_name(&self, id: &str) -> Result<bool, ConnectorError> {
        if self.fields.name_fields().is_empty() {
            return Ok(false);
        }
        // Every mapped field: the email the record holds tells the bare
        // stand-in of older releases (its local part) from a name.
        let current = self.mapped_fields_of(id)?;
        Ok(self.fields.customer_from(id, &current).name.is_some())
    }

    /// Record `id`'s id, date and mapped fields ([`Config::selected_fields`]).
    fn mapped_fields_of(&self, id: &str) -> Result<Map<String, Value>, ConnectorError> {
        let selected = self.selected_fields().join(",");
        let resp = self.call(|base, token| {
            Ok(Request::get(self.record_url(base, id))
                .query(&[("fields", selected.as_str())])?
                .bearer_token(token))
        })?;
        resp.json()
    }

    /// `error`, unless it is a plain `NOT_FOUND` (not `ENTITY_IS_DELETED`,
    /// a record's own answer) and the org does not know the object or the
    /// API version either: Salesforce answers a mistyped `object`, a
    /// version newer than the org runs, or an object the integration user
    /// cannot see with the same 404 as a record that is not there. Read as
    /// the record gone, a delete counted as done and left the record in
    /// Salesforce, and a read removed the customer's link. One more
    /// request (the object's basic information), made only after such a
    /// 404.
    fn record_gone(&self, error: ConnectorError) -> ConnectorError {
        let ConnectorError::NotFound(message) = &error else {
            return error;
        };
        if !message.contains(": NOT_FOUND: ") {
            return error;
        }
        let probe = self.call(|base, token| {
            Ok(
                Request::get(format!("{}/sobjects/{}", self.data_url(base), self.object))
                    .bearer_token(token),
            )
        });
        match probe {
            Ok(_) => error,
            Err(ConnectorError::NotFound(_)) => ConnectorError::permanent(format!(
                "{message}; and this org does not know object `{}` under API version {} \
                 either (is the `object` or `api_version` setting right, and may the \
                 integration user see the object?): the record was not touched",
                self.object, self.api_version
            )),
            Err(other) => other,
        }
    }

    /// `error`, unless it says record `id` is deleted and a merge deleted
    /// it: Salesforce deletes a merge's losing records (`ENTITY_IS_DELETED`
    /// like any other) and keeps the winner's id in their `MasterRecordId`.
    /// Read as deleted, the customer linked to the loser was deleted in
    /// ferry and every other system, while its person lives on in the
    /// winner. One more request (`queryAll`, the only read of a deleted
    /// record), made only after such a 404; an object without
    /// `MasterRecordId` (a custom one: no merge) answers `INVALID_FIELD`,
    /// and the record is deleted.
    fn not_merged(&self, error: ConnectorError, id: &str) -> ConnectorError {
        match &error {
            ConnectorError::NotFound(message)
                if message.contains("HTTP 404: ENTITY_IS_DELETED: ") && is_record_id(id) => {}
            _ => return error,
        }
        let soql = format!(
            "SELECT Id, MasterRecordId FROM {} WHERE Id = '{id}'",
            self.object
        );
        let read = self.call(|base, token| {
            Ok(Request::get(format!("{}/queryAll", self.data_url(base)))
                .query(&[("q", soql.as_str())])?
                .bearer_token(token))
        });
        let result: QueryResult = match read.and_then(|resp| resp.json()) {
            Ok(result) => result,
            Err(ConnectorError::Permanent(message)) if message.contains(": INVALID_FIELD: ") => {
                return error
            }
            Err(other) => return other,
        };
        match result
            .records
            .first()
            .and_then(|row| row.get("MasterRecordId"))
            .and_then(Value::as_str)
        {
            Some(master) => ConnectorError::permanent(format!(
                "{} {id} was merged into {master} in Salesforce (a merge deletes the \
                 losing records): nothing was changed in ferry; a person decides what \
                 becomes of the customer (delete it through ferry's API if {master}'s \
                 customer is the same person; a reconciliation reports {master} as a \
                 record no link holds if none is linked to it)",
                self.object
            )),
            None => error,
        }
    }

    fn record_url(&self, base: &str, id: &str) -> String {
        format!(
            "{}/sobjects/{}/{}",
            self.data_url(base),
            self.object,
            ferry_sdk::http::path_segment(id)
        )
    }

    /// Sends the request `build` makes with a token and the instance's base
    /// URL; a 401 refreshes the token and sends it once more.
    fn call(
        &self,
        build: impl Fn(&str, &Token) -> Result<Request, ConnectorError>,
    ) -> Result<Response, ConnectorError> {
        let call_options = format!("client={}", self.client_name);
        oauth::with_token(TOKEN_NAME, &self.grant(), |token| {
            let base = self.base_url(token)?;
            let resp = build(&base, token)?
                .header("accept", "application/json")
                .header("sforce-call-options", call_options.as_str())
                .send()?;
            checked(resp)
        })
    }

    fn create(&self, body: &Value) -> Result<String, ConnectorError> {
        let resp = self.call(|base, token| {
            Request::post(format!("{}/sobjects/{}/", self.data_url(base), self.object))
                .bearer_token(token)
                .json(body)
        })?;
        Ok(resp.json::<SaveResult>()?.id)
    }

    /// An upsert on the external id: a retried create finds the record the
    /// first attempt made instead of making a second one.
    fn upsert(&self, field: &str, local_id: &str, body: &Value) -> Result<String, ConnectorError> {
        let url = |base: &str| {
            format!(
                "{}/sobjects/{}/{field}/{}",
                self.data_url(base),
                self.object,
                ferry_sdk::http::path_segment(local_id)
            )
        };
        let held_by = || {
            self.call(|base, token| {
                Request::get(url(base))
                    .query(&[("fields", "Id")])
                    .map(|r| r.bearer_token(token))
            })
        };
        let resp = self
            .call(|base, token| Request::patch(url(base)).bearer_token(token).json(body))
            .map_err(|error| match error {
                // Two upserts of one external id at once (a create retried
                // while its first attempt still ran): on a Unique field the
                // second is refused as a duplicate of the record the first
                // made, which its retry finds and updates. Refused for
                // good, the create was dead-lettered with its Contact made.
                // Unless no live record holds the value: a deleted one in
                // the Recycle Bin does (Salesforce's unique checks count
                // it), and every retry and replay meets it until it is
                // undeleted or purged, which a person must choose.
                ConnectorError::Permanent(message) if duplicate_value_of(&message, field) => {
                    match held_by() {
                        Ok(_) => ConnectorError::retryable(message),
                        Err(ConnectorError::NotFound(_)) => ConnectorError::permanent(format!(
                            "{message}; no live {} holds {field} = {local_id}: the record \
                             holding it is in the Recycle Bin. Undelete it (this create then \
                             updates it) or empty it from the Recycle Bin, then replay",
                            self.object
                        )),
                        Err(other) => {
                            let detail = format!(
                                "{message}; reading the record that holds it failed: {}",
                                other.message()
                            );
                            with_message(other, detail)
                        }
                    }
                }
                other => other,
            })?;
        if resp.status != 204 && !resp.body.is_empty() {
            return Ok(resp.json::<SaveResult>()?.id);
        }
        // Versions before 46.0 answer an update through upsert with 204 and
        // no body: ask for the id.
        let resp = held_by()?;
        let row: Map<String, Value> = resp.json()?;
        row.get("Id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                ConnectorError::permanent(format!(
                    "Salesforce returned no Id for {}.{field} = {local_id}",
                    self.object
                ))
            })
    }

    /// `SELECT Id, LastModifiedDate, <mapped fields> FROM <object> ORDER BY Id`.
    /// What a read asks for: the id, the date and the mapped fields.
    fn selected_fields(&self) -> Vec<&str> {
        let mut fields = vec!["Id", "LastModifiedDate"];
        for field in self.fields.fields() {
            if !fields.iter().any(|f| f.eq_ignore_ascii_case(field)) {
                fields.push(field);
            }
        }
        fields
    }

    fn list_query(&self, after: Option<&str>, limit: u32) -> String {
        let filter = after.map_or(String::new(), |id| format!(" WHERE Id > '{id}'"));
        format!(
            "SELECT {} FROM {}{filter} ORDER BY Id LIMIT {limit}",
            self.selected_fields().join(", "),
            self.object
        )
    }

    fn remote_record(&self, row: &Map<String, Value>) -> Result<RemoteRecord, ConnectorError> {
        let id = row
            .get("Id")
            .and_then(Value::as_str)
            .ok_or_else(|| ConnectorError::permanent("Salesforce returned a record without Id"))?;
        let record = RemoteRecord::new(id, self.fields.customer_from(id, row).to_json());
        Ok(
            match row
                .get("LastModifiedDate")
                .and_then(Value::as_str)
                .and_then(parse_datetime_ms)
            {
                Some(ms) => record.with_updated_at_ms(ms),
                None => record,
            },
        )
    }
}

fn setting_or(name: &str, default: &str) -> String {
    settings::get(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn checked_name(setting: &str, name: &str) -> Result<(), ConnectorError> {
    if is_api_name(name) {
        Ok(())
    } else {
        Err(ConnectorError::permanent(format!(
            "setting `{setting}`: `{name}` is not a Salesforce API name"
        )))
    }
}

/// One entry of a Salesforce error body (`[{message, errorCode, fields}]`).
#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    message: String,
    #[serde(default, rename = "errorCode")]
    error_code: String,
    #[serde(default)]
    fields: Vec<String>,
}

/// A 2xx answer, or the error its status and Salesforce's `errorCode` say.
fn checked(resp: Response) -> Result<Response, ConnectorError> {
    if resp.is_success() {
        return Ok(resp);
    }
    Err(api_error(&resp))
}

fn api_error(resp: &Response) -> ConnectorError {
    let errors: Vec<ApiError> = ferry_sdk::json::from_slice(&resp.body).unwrap_or_default();
    let detail = if errors.is_empty() {
        resp.text().chars().take(300).collect::<String>()
    } else {
        errors
            .iter()
            .map(|e| {
                let mut line = format!("{}: {}", e.error_code, e.message);
                if !e.fields.is_empty() {
                    line.push_str(&format!(" (fields: {})", e.fields.join(", ")));
                }
                line
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let message = format!("Salesforce answered HTTP {}: {detail}", resp.status);
    let code = errors.first().map(|e| e.error_code.as_str()).unwrap_or("");
    // Seconds or an HTTP date (a maintenance window's end).
    let retry_after = resp.retry_after_ms();
    match code {
        "REQUEST_LIMIT_EXCEEDED" => {
            let retry_after = retry_after
                // The org's rolling 24-hour allowance: it comes back as old
                // requests age out, not after a push's backoff of seconds,
                // so the connector waits an hour between probes.
                .or_else(|| {
                    message
                        .contains("TotalRequests")
                        .then_some(DAILY_LIMIT_WAIT_MS)
                });
            return ConnectorError::rate_limited(retry_after, message);
        }
        "INVALID_SESSION_ID" => return ConnectorError::unauthorized(message),
        // Salesforce's 403 is a refusal on permissions (REST API, "Status
        // Codes and Error Responses"), not a token to refresh: one
        // record's sharing, an object's access, the API off for the org.
        _ if resp.status == 403 => return ConnectorError::permanent(message),
        // The same 404 answers a record id sent under another object (an
        // `object` setting changed while links point at Contacts) or an
        // external id field that does not exist: the record is not gone,
        // the request is wrong. Read as gone, a delete counted as done and
        // left the record in Salesforce, with no dead letter.
        "NOT_FOUND"
            if errors
                .first()
                .is_some_and(|e| e.message.starts_with("Provided external ID field")) =>
        {
            return ConnectorError::permanent(message)
        }
        "ENTITY_IS_DELETED" | "NOT_FOUND" => return ConnectorError::not_found(message),
        // The org is read-only for a planned maintenance (it can last
        // hours), or Salesforce says when to come back: the remote says
        // "later", not "no". Read as a passing failure, each change's
        // attempts ran out within the window and it was dead-lettered;
        // read as a rate limit, the connector pauses and no change spends
        // an attempt.
        "INSERT_UPDATE_DELETE_NOT_ALLOWED_DURING_MAINTENANCE" => {
            return ConnectorError::rate_limited(
                Some(retry_after.unwrap_or(MAINTENANCE_WAIT_MS)),
                message,
            );
        }
        "SERVER_UNAVAILABLE" if retry_after.is_some() => {
            return ConnectorError::rate_limited(retry_after, message);
        }
        // Unavailable without a date, or a query that ran out of time:
        // both pass.
        "SERVER_UNAVAILABLE"
        | "UNABLE_TO_LOCK_ROW"
        | "QUERY_TIMEOUT"
        // A query locator released before its next batch was asked for (a
        // user holds 10 open at most; opening another drops the oldest):
        // the listing asks again from its own keyset cursor.
        | "INVALID_QUERY_LOCATOR" => return ConnectorError::retryable(message),
        // A trigger's or a workflow's row lock, reported under the error
        // of the operation it broke: transient too.
        _ if message.contains("UNABLE_TO_LOCK_ROW") => {
            return ConnectorError::retryable(message);
        }
        _ => {}
    }
    match resp.status {
        // An upsert whose external id matches several records; an API
        // version Salesforce has retired (410 GONE is never a record's
        // answer: a deleted one is 404 `ENTITY_IS_DELETED`). Read as
        // gone, every delete counted as done and left the record there.
        300 | 410 => ConnectorError::permanent(message),
        // A 404 without Salesforce's own error (a proxy's or a gateway's
        // page) is no record's answer: read as gone, a delete counted as
        // done and left the record there.
        404 if errors.is_empty() => ConnectorError::permanent(message),
        _ => ConnectorError::from_status(resp.status, resp.header("retry-after"), "")
            .map(|err| with_message(err, message.clone()))
            .unwrap_or_else(|| ConnectorError::permanent(message)),
    }
}

/// `err` with `message` in place of the generic one.
fn with_message(err: ConnectorError, message: String) -> ConnectorError {
    match err {
        ConnectorError::Retryable(_) => ConnectorError::Retryable(message),
        ConnectorError::RateLimited(r) => ConnectorError::rate_limited(r.retry_after_ms, message),
        ConnectorError::Permanent(_) => ConnectorError::Permanent(message),
        ConnectorError::NotFound(_) => ConnectorError::NotFound(message),
        ConnectorError::Unauthorized(_) => ConnectorError::Unauthorized(message),
        ConnectorError::InvalidSignature(_) => ConnectorError::InvalidSignature(message),
        ConnectorError::Unsupported(_) => ConnectorError::Unsupported(message),
    }
}

/// The first 8 bytes of the SHA-256 of a notification's fields (name and
/// text, in name order), in hex: the same message gives the same digest,
/// a message carrying any other value another.
fn fields_digest(fields: &serde_json::Map<String, Value>) -> String {
    use sha2::{Digest, Sha256};
    let mut names: Vec<&String> = fields.keys().collect();
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(fields[name].to_string().as_bytes());
        hasher.update([0]);
    }
    hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
