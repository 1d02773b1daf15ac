//! An in-process fake of the parts of Salesforce that ferry talks to, so the
//! Salesforce connector can be tested without an org: one axum server plays
//! both the login host and the instance host (`instance_url` is the fake's
//! own base URL).
//!
//! What it models, and where the behaviour is documented:
//!
//! * **OAuth 2.0 Client Credentials Flow** (Salesforce Help, "OAuth 2.0
//!   Client Credentials Flow for Server-to-Server Integration"):
//!   `POST /services/oauth2/token` with a form body
//!   `grant_type=client_credentials&client_id=..&client_secret=..` answers
//!   `access_token`, `signature`, `scope`, `instance_url`, `id` (the identity
//!   URL `<host>/id/<orgId>/<userId>`), `token_type: Bearer` and `issued_at`
//!   (milliseconds since the epoch, as a string). As in Salesforce there is
//!   no `expires_in` and no `refresh_token`: a client learns that its token
//!   died from a 401 and asks for a new one. Wrong credentials answer 400
//!   `invalid_client`, other grant types 400 `unsupported_grant_type`.
//! * **REST API Developer Guide**, the resources a sync engine uses, under
//!   `/services/data/vNN.N/`:
//!   - every call needs `Authorization: Bearer <token>` (or `OAuth <token>`)
//!     of a live session, else 401 `INVALID_SESSION_ID` ("Status Codes and
//!     Error Responses"); [`FakeSalesforce::expire_sessions`] plays a session
//!     timeout;
//!   - sObject Basic Information / sObject Rows: create (201 with
//!     `{id, success, errors}`), retrieve (with `attributes`, `Id`, the
//!     system fields `CreatedDate`, `LastModifiedDate`, `SystemModstamp`,
//!     `IsDeleted`, and `?fields=` selection), update by PATCH (204) and
//!     delete (204); a deleted row answers 404 `ENTITY_IS_DELETED`, an
//!     unknown one 404 `NOT_FOUND`, and a record id of another object
//!     404 `NOT_FOUND` "Provided external ID field does not exist or is
//!     not accessible"; an object the org does not have (the standard four
//!     below and any `…__c` are there) is 404 `NOT_FOUND` too, and 400
//!     `INVALID_TYPE` in a query, and an API version newer than the org
//!     runs (past Winter '27's 68.0) is 404 `NOT_FOUND`: a record that is
//!     not there and a request the org cannot serve look alike; sObject
//!     Basic Information (`GET sobjects/{Object}`) answers an object it
//!     has; ids are 18-character case-safe ids with
//!     the object's key prefix (`003` Contact, `001` Account, `00Q` Lead,
//!     `006` Opportunity, `a0X` for anything else) and the documented
//!     checksum suffix, and a 15-character id is accepted too;
//!   - Contact validation: `LastName` is required (`REQUIRED_FIELD_MISSING`),
//!     `Email` must look like an address (`INVALID_EMAIL_ADDRESS`), a
//!     standard text field holds at most its documented length (Object
//!     Reference: `MailingCity` 40, `Email` 80, `MailingPostalCode` 20…;
//!     `STRING_TOO_LONG` naming it), a field
//!     the object does not have is `INVALID_FIELD`, a system field in the
//!     body is `INVALID_FIELD_FOR_INSERT_UPDATE`, a body that is not a JSON
//!     object is `JSON_PARSER_ERROR`; field names are case-insensitive, as
//!     in Salesforce;
//!   - Query (`GET query?q=`) for a small SOQL subset:
//!     `SELECT f1, f2 FROM Object [WHERE f op v [AND ...]] [ORDER BY f
//!     [ASC|DESC]] [LIMIT n]`, with `op` one of `= != < <= > >=` and `v` a
//!     quoted string, a datetime literal, a number, `true`/`false` or
//!     `null`; anything else is `MALFORMED_QUERY`. Deleted rows are left
//!     out of `query` and read by `queryAll` ("QueryAll": deleted and
//!     merged records, `IsDeleted` true). Results are paged with
//!     `nextRecordsUrl` (`.../query/01g...-<offset>`) and the page size
//!     follows `Sforce-Query-Options: batchSize=N` clamped to 200..=2000
//!     (default 2000), as the "Query Options Header" page says, unless
//!     [`FakeSalesforceConfig::query_page_size`] overrides it so tests can
//!     page through a handful of rows. An unknown locator is 400
//!     `INVALID_QUERY_LOCATOR`. A query's rows are a snapshot taken when it
//!     runs; a locator can be fetched again (a retry) until the last page
//!     has been served, after which it is closed. Rows come in `Id` order
//!     unless `ORDER BY` says otherwise (nulls first ascending, last
//!     descending);
//!   - Merges ("Merging Records", Apex Developer Guide, "Triggers and
//!     Merge Statements"): [`FakeSalesforce::merge_records`] deletes the
//!     losing record and sets its `MasterRecordId` to the winner's id (a
//!     system field, null otherwise, of Contact, Account and Lead only: a
//!     custom object's query of it is `INVALID_FIELD`), as a merge in the
//!     UI does;
//!   - API request limits: [`FakeSalesforce::fail_with_request_limit`]
//!     makes the next authenticated calls answer 403
//!     `REQUEST_LIMIT_EXCEEDED`.
//! * **Outbound Messaging** (SOAP API Developer Guide, "Understanding the
//!   Outbound Messaging WSDL" and "Building a Listener"):
//!   [`FakeSalesforce::send_outbound_message`] POSTs the `notifications`
//!   SOAP envelope (namespace `http://soap.sforce.com/2005/09/outbound`;
//!   `OrganizationId`, `ActionId`, a nil `SessionId`, `EnterpriseUrl`,
//!   `PartnerUrl`, and at most 100 `Notification`s, each with its own `04l`
//!   notification id and an `sObject` carrying `sf:Id` and every non-null
//!   field of the record's *current* state, as the guide warns the listener
//!   only ever sees the latest data) and reports whether the listener
//!   answered with a `notificationsResponse` whose `Ack` is `true`.
//!   [`FakeSalesforce::outbound_message_xml`] and
//!   [`FakeSalesforce::send_raw`] let a test craft a redelivery (same
//!   notification ids) or a message from another org.
//!
//! What it does not model: other OAuth flows, refresh tokens, client
//! credentials in an HTTP Basic header, token revocation or introspection;
//! describe, composite, collections, upsert by external id, Bulk API,
//! SOSL, relationship queries, aggregate SOQL, `OR`/`IN`/`LIKE`
//! in SOQL; field types and lengths (every field is stored as the JSON value
//! sent), field-level security, sharing, triggers, duplicate rules; locator
//! expiry; the `Sforce-Limit-Info` response header; Outbound Messaging
//! retries, queuing and the "Send Session ID" option (the fake sends once
//! and reports the answer; a test drives any redelivery itself); an
//! Outbound Message sends every field the record holds, not the ones its
//! setup selects. Timestamps come from the wall clock in whole seconds, as
//! Salesforce's do (`….000+0000` over REST, `….000Z` in a message), so two
//! writes in one second share a `LastModifiedDate`.
//! Request
//! headers such as `Sforce-Call-Options` are recorded (see
//! [`FakeSalesforce::requests`]) but have no effect.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

mod ids;
mod soql;

use self::ids::*;
use self::soql::*;

/// The most notifications Salesforce puts in one outbound message
/// (`maxOccurs="100"` in the outbound messaging WSDL).
pub const MAX_NOTIFICATIONS: usize = 100;

/// The namespace of the outbound messaging `notifications` call.
pub const OUTBOUND_NAMESPACE: &str = "http://soap.sforce.com/2005/09/outbound";

/// API version used in URLs the fake makes up itself (outbound message
/// `EnterpriseUrl`/`PartnerUrl`).
const API_VERSION: &str = "62.0";

/// The workflow action every outbound message of this fake comes from.
const ACTION_ID: &str = "04k000000000001AAA";

/// The integration user the client credentials flow runs as.
const USER_ID: &str = "005000000000001AAA";

/// Fields a Contact accepts besides custom (`__c`) ones. Deliberately a
/// small slice of the real Contact: what ferry maps.
const CONTACT_FIELDS: &[&str] = &[
    "FirstName",
    "LastName",
    "Email",
    "Phone",
    "MailingStreet",
    "MailingCity",
    "MailingState",
    "MailingPostalCode",
    "MailingCountry",
    "Description",
];

/// Fields Salesforce maintains itself: readable, never writable.
const SYSTEM_FIELDS: &[&str] = &[
    "Id",
    "IsDeleted",
    "CreatedDate",
    "LastModifiedDate",
    "SystemModstamp",
    "MasterRecordId",
];

/// How the fake org is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSalesforceConfig {
    /// The 18-character organization id (`00D...`).
    pub org_id: String,
    /// The connected app's consumer key.
    pub client_id: String,
    /// The connected app's consumer secret.
    pub client_secret: String,
    /// Rows per query page, overriding `Sforce-Query-Options: batchSize`
    /// (which Salesforce clamps to 200..=2000), so tests can page through a
    /// few rows.
    pub query_page_size: Option<usize>,
}

impl Default for FakeSalesforceConfig {
    fn default() -> Self {
        Self {
            org_id: "00D000000000001EAA".to_owned(),
            client_id: "ferry-test-client".to_owned(),
            client_secret: "ferry-test-secret".to_owned(),
            query_page_size: None,
        }
    }
}

/// How many API calls of each kind the fake has served (successful ones
/// only; the UI helpers on [`FakeSalesforce`] are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records created through `POST sobjects/{Object}`.
    pub creates: u64,
    /// Records updated through `PATCH sobjects/{Object}/{id}`.
    pub updates: u64,
    /// Records deleted through `DELETE sobjects/{Object}/{id}`.
    pub deletes: u64,
    /// Records read through `GET sobjects/{Object}/{id}`.
    pub retrieves: u64,
    /// SOQL queries run (`GET query?q=`).
    pub queries: u64,
    /// Further pages fetched (`GET query/{locator}`).
    pub query_pages: u64,
    /// Tokens issued by `POST /services/oauth2/token`.
    pub token_requests: u64,
}

/// One HTTP request the fake received, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Every header, names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as text (lossily decoded).
    pub body: String,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What happened when the fake delivered an outbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundDelivery {
    /// The listener's HTTP status.
    pub status: u16,
    /// The listener's response body.
    pub body: String,
    /// Whether Salesforce would count the message as delivered: a 2xx
    /// answer holding a `notificationsResponse` with `Ack` `true`.
    pub acked: bool,
    /// The notification ids sent, in message order.
    pub notification_ids: Vec<String>,
}

struct StoredRecord {
    /// Canonical object name, e.g. `Contact`.
    object: String,
    /// Writable fields; a field set to null is removed.
    fields: Map<String, Value>,
    created: String,
    modified: String,
    deleted: bool,
    /// The record a merge deleted this one into.
    master: Option<String>,
}

impl StoredRecord {
    /// The value of field `name` (exact, canonical spelling) as Salesforce
    /// would report it.
    fn get(&self, id: &str, name: &str) -> Value {
        match name {
            "Id" => Value::String(id.to_owned()),
            "IsDeleted" => Value::Bool(self.deleted),
            "MasterRecordId" => self.master.clone().map_or(Value::Null, Value::String),
            "CreatedDate" => Value::String(self.created.clone()),
            "LastModifiedDate" | "SystemModstamp" => Value::String(self.modified.clone()),
            // Field names ignore case (a custom field queried in another
            // spelling than it was written in is the same field).
            _ => self
                .fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map_or(Value::Null, |(_, v)| v.clone()),
        }
    }

    /// Every field as the REST API returns a row: the object's known
    /// fields (null when unset), the stored ones and the system fields.
    fn full(&self, id: &str) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("Id".to_owned(), Value::String(id.to_owned()));
        if self.object == "Contact" {
            for field in CONTACT_FIELDS {
                out.insert((*field).to_owned(), Value::Null);
            }
        }
        for (k, v) in &self.fields {
            out.insert(k.clone(), v.clone());
        }
        for field in &SYSTEM_FIELDS[1..] {
            out.insert((*field).to_owned(), self.get(id, field));
        }
        out
    }
}

/// A query result waiting to be paged through.
struct Cursor {
    rows: Vec<Value>,
    page_size: usize,
}

#[derive(Default)]
struct Data {
    /// Id -> record, deleted ones included (they answer ENTITY_IS_DELETED).
    records: BTreeMap<String, StoredRecord>,
    tokens: HashSet<String>,
    cursors: HashMap<String, Cursor>,
    limit_failures: u64,
    unavailable: bool,
    query_cap: Option<usize>,
    requests: Vec<RecordedRequest>,
    counts: Counts,
    next_seq: u64,
}

impl Data {
    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

struct Shared {
    cfg: FakeSalesforceConfig,
    base_url: String,
    data: Mutex<Data>,
}

impl Shared {
    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake Salesforce org; stops listening on drop.
pub struct FakeSalesforce {
    shared: Arc<Shared>,
    http: reqwest::Client,
    server: JoinHandle<()>,
}

impl FakeSalesforce {
    /// Starts the fake on a free 127.0.0.1 port, on the current tokio
    /// runtime.
    pub async fn start(cfg: FakeSalesforceConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake Salesforce")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cfg,
            base_url: format!("http://{addr}"),
            data: Mutex::new(Data::default()),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            // Only fails if the listener breaks; the test then sees
            // connection errors, which say more than a log line here would.
            let _ = axum::serve(listener, app).await;
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the outbound messaging client")?;
        Ok(Self {
            shared,
            http,
            server,
        })
    }

    /// The base URL (`http://127.0.0.1:PORT`): both the login host and the
    /// `instance_url`.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The organization id.
    pub fn org_id(&self) -> &str {
        &self.shared.cfg.org_id
    }

    /// The configuration the fake runs with.
    pub fn config(&self) -> &FakeSalesforceConfig {
        &self.shared.cfg
    }

    /// Invalidates every token issued so far, as a session timeout would:
    /// the next data call with one answers 401 `INVALID_SESSION_ID`.
    pub fn expire_sessions(&self) {
        self.shared.data().tokens.clear();
    }

    /// Makes the next `n` authenticated data-API calls answer 403
    /// `REQUEST_LIMIT_EXCEEDED` for the org's concurrent long-running
    /// requests (`ConcurrentPerOrgLongTxn`, a limit that clears in seconds;
    /// replacing any failures still pending).
    /// Calls without a live session answer 401 and do not use one up.
    pub fn fail_with_request_limit(&self, n: u64) {
        self.shared.data().limit_failures = n;
    }

    /// While `down`, every authenticated data-API call answers 503
    /// `SERVER_UNAVAILABLE`, as Salesforce documents for an instance down
    /// for maintenance or overloaded (token requests still answer).
    pub fn set_unavailable(&self, down: bool) {
        self.shared.data().unavailable = down;
    }

    /// Makes every SOQL query return at most `cap` rows and say it is
    /// done, as a query does when records silently drop out of what the
    /// integration user may see (a sharing rule changed, a profile lost a
    /// permission): a listing that looks complete and is not. `None` lifts
    /// it.
    pub fn truncate_queries(&self, cap: Option<usize>) {
        self.shared.data().query_cap = cap;
    }

    /// The API call counters so far.
    pub fn counts(&self) -> Counts {
        self.shared.data().counts
    }

    /// Every request received so far, token requests included.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.data().requests.clone()
    }

    /// Creates a record as a person in the Salesforce UI would, with the
    /// same validation as the API; returns its id.
    ///
    /// # Panics
    /// If the fields fail validation: that is a mistake in the test.
    #[track_caller]
    pub fn insert_record(&self, object: &str, fields: Value) -> String {
        match create_record(&self.shared, object, &fields) {
            Ok(id) => id,
            Err(err) => panic!("insert_record({object}) failed validation: {err:?}"),
        }
    }

    /// Updates a record as a person in the UI would (a null value clears
    /// the field).
    ///
    /// # Panics
    /// If the record does not exist or the fields fail validation.
    #[track_caller]
    pub fn update_record(&self, object: &str, id: &str, fields: Value) {
        if let Err(err) = update_record(&self.shared, object, id, &fields) {
            panic!("update_record({object}, {id}) failed: {err:?}");
        }
    }

    /// Deletes a record as a person in the UI would (it goes to the
    /// recycle bin: the API then answers `ENTITY_IS_DELETED`).
    ///
    /// # Panics
    /// If the record does not exist or is already deleted.
    #[track_caller]
    pub fn delete_record(&self, object: &str, id: &str) {
        if let Err(err) = delete_record(&self.shared, object, id) {
            panic!("delete_record({object}, {id}) failed: {err:?}");
        }
    }

    /// Merges record `loser` into `master`, as a merge in Salesforce does:
    /// the loser is deleted with `MasterRecordId` naming the master, whose
    /// `LastModifiedDate` moves.
    ///
    /// # Panics
    /// If either record does not exist or is deleted.
    #[track_caller]
    pub fn merge_records(&self, object: &str, master: &str, loser: &str) {
        let mut data = self.shared.data();
        let ids = match (find(&data, object, master), find(&data, object, loser)) {
            (Ok((m, mr)), Ok((l, lr))) if !mr.deleted && !lr.deleted => Some((m, l)),
            _ => None,
        };
        let Some((master, loser)) = ids else {
            panic!("merge_records({object}, {master}, {loser}): both must be live records");
        };
        let now = stamp_now();
        if let Some(rec) = data.records.get_mut(&loser) {
            rec.deleted = true;
            rec.master = Some(master.clone());
            rec.modified.clone_from(&now);
        }
        if let Some(rec) = data.records.get_mut(&master) {
            rec.modified = now;
        }
    }

    /// Takes a record out of the integration user's reach: its Recycle Bin
    /// emptied (a hard delete), or a sharing change that hides it from
    /// that user. Salesforce answers both as it answers an id it never had
    /// (404 `NOT_FOUND`; left out of every query), and so does the fake.
    ///
    /// # Panics
    /// If the record does not exist.
    #[track_caller]
    pub fn purge_record(&self, object: &str, id: &str) {
        let mut data = self.shared.data();
        let id = match find(&data, object, id) {
            Ok((id, _)) => id,
            Err(err) => panic!("purge_record({object}, {id}) failed: {err:?}"),
        };
        data.records.remove(&id);
    }

    /// The record's current fields as the REST API would return them
    /// (without `attributes`); `None` if it is unknown or deleted.
    pub fn record(&self, object: &str, id: &str) -> Option<Value> {
        let data = self.shared.data();
        let (id, rec) = find(&data, object, id).ok()?;
        (!rec.deleted).then(|| Value::Object(rec.full(&id)))
    }

    /// Every live (not deleted) record of `object`, in id order, shaped as
    /// [`FakeSalesforce::record`].
    pub fn records(&self, object: &str) -> Vec<Value> {
        let data = self.shared.data();
        data.records
            .iter()
            .filter(|(_, r)| !r.deleted && r.object.eq_ignore_ascii_case(object))
            .map(|(id, r)| Value::Object(r.full(id)))
            .collect()
    }

    /// Builds the SOAP envelope of one outbound message from org `org_id`
    /// about `object`, one `Notification` per `(notification id, record
    /// id)` pair, with each record's current fields; a deleted or unknown
    /// record gets only `sf:Id` ("if the record is deleted before the
    /// notification is delivered, the notification contains no data"). Does not enforce the
    /// 100-notification limit, so a test can build a message Salesforce
    /// never would.
    pub fn outbound_message_xml(
        &self,
        org_id: &str,
        object: &str,
        notifications: &[(String, String)],
    ) -> String {
        let data = self.shared.data();
        let base = &self.shared.base_url;
        let org15 = org_id.get(..15).unwrap_or(org_id);
        let mut xml = String::new();
        xml.push_str(concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/""#,
            r#" xmlns:xsd="http://www.w3.org/2001/XMLSchema""#,
            r#" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
            "<soapenv:Body>",
        ));
        xml.push_str(&format!(
            concat!(
                r#"<notifications xmlns="{ns}">"#,
                "<OrganizationId>{org}</OrganizationId>",
                "<ActionId>{action}</ActionId>",
                r#"<SessionId xsi:nil="true"/>"#,
                "<EnterpriseUrl>{base}/services/Soap/c/{v}/{org15}</EnterpriseUrl>",
                "<PartnerUrl>{base}/services/Soap/u/{v}/{org15}</PartnerUrl>",
            ),
            ns = OUTBOUND_NAMESPACE,
            org = xml_escape(org_id),
            action = ACTION_ID,
            base = xml_escape(base),
            v = API_VERSION,
            org15 = xml_escape(org15),
        ));
        let object_type = canonical_object(object);
        for (notification_id, record_id) in notifications {
            xml.push_str(&format!(
                concat!(
                    "<Notification><Id>{nid}</Id>",
                    r#"<sObject xsi:type="sf:{ty}" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">"#,
                    "<sf:Id>{rid}</sf:Id>",
                ),
                nid = xml_escape(notification_id),
                ty = xml_escape(&object_type),
                rid = xml_escape(record_id),
            ));
            if let Some((id, rec)) = find(&data, object, record_id)
                .ok()
                .filter(|(_, rec)| !rec.deleted)
            {
                // Salesforce lists the fields alphabetically and leaves
                // null ones out.
                let mut fields: Vec<(String, Value)> = rec
                    .full(&id)
                    .into_iter()
                    .filter(|(k, v)| k != "Id" && k != "IsDeleted" && !v.is_null())
                    .collect();
                fields.sort_by(|a, b| a.0.cmp(&b.0));
                for (name, value) in fields {
                    let text = match value {
                        // The SOAP form of a date: `….000Z`, where REST
                        // writes `….000+0000`.
                        Value::String(s)
                            if matches!(
                                name.as_str(),
                                "CreatedDate" | "LastModifiedDate" | "SystemModstamp"
                            ) =>
                        {
                            s.strip_suffix("+0000")
                                .map_or(s.clone(), |d| format!("{d}Z"))
                        }
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    xml.push_str(&format!(
                        "<sf:{name}>{}</sf:{name}>",
                        xml_escape(&text),
                        name = xml_escape(&name)
                    ));
                }
            }
            xml.push_str("</sObject></Notification>");
        }
        xml.push_str("</notifications></soapenv:Body></soapenv:Envelope>");
        xml
    }

    /// Sends one outbound message about `record_ids` (live records of
    /// `object`) to `endpoint_url`, as a workflow rule firing would, each
    /// with a fresh notification id.
    pub async fn send_outbound_message(
        &self,
        endpoint_url: &str,
        object: &str,
        record_ids: &[&str],
    ) -> anyhow::Result<OutboundDelivery> {
        if record_ids.len() > MAX_NOTIFICATIONS {
            bail!(
                "an outbound message holds at most {MAX_NOTIFICATIONS} notifications, not {}",
                record_ids.len()
            );
        }
        let notifications = {
            let mut data = self.shared.data();
            let mut notifications = Vec::with_capacity(record_ids.len());
            for record_id in record_ids {
                match find(&data, object, record_id) {
                    Ok((_, rec)) if rec.deleted => {
                        bail!("{object} {record_id} is deleted; no workflow fires for it")
                    }
                    Ok((id, _)) => notifications.push((String::new(), id)),
                    Err(_) => bail!("no {object} with id {record_id}"),
                }
            }
            for (notification_id, _) in &mut notifications {
                *notification_id = make_id("04l", data.next_seq());
            }
            notifications
        };
        let xml = self.outbound_message_xml(self.org_id(), object, &notifications);
        let mut delivery = self.send_raw(endpoint_url, xml).await?;
        delivery.notification_ids = notifications.into_iter().map(|(n, _)| n).collect();
        Ok(delivery)
    }

    /// POSTs `xml` to `endpoint_url` with the headers Salesforce sends an
    /// outbound message with, and reports the answer. `notification_ids`
    /// in the result is empty: the fake does not parse what it is given.
    pub async fn send_raw(
        &self,
        endpoint_url: &str,
        xml: String,
    ) -> anyhow::Result<OutboundDelivery> {
        let resp = self
            .http
            .post(endpoint_url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", "\"\"")
            .body(xml)
            .send()
            .await
            .with_context(|| format!("sending an outbound message to {endpoint_url}"))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .with_context(|| format!("reading the answer of {endpoint_url}"))?;
        Ok(OutboundDelivery {
            status: status.as_u16(),
            acked: status.is_success() && is_ack(&body),
            body,
            notification_ids: Vec::new(),
        })
    }
}

impl Drop for FakeSalesforce {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Whether `body` holds a `notificationsResponse` with `<Ack>true</Ack>`,
/// whatever namespace prefixes the listener chose.
fn is_ack(body: &str) -> bool {
    if !body.contains("notificationsResponse") {
        return false;
    }
    let mut rest = body;
    while let Some(start) = rest.find('<') {
        rest = &rest[start + 1..];
        let Some(end) = rest.find('>') else {
            return false;
        };
        let tag = &rest[..end];
        let name = tag.split_whitespace().next().unwrap_or("");
        let local = name.rsplit(':').next().unwrap_or(name);
        rest = &rest[end + 1..];
        if local == "Ack" && !tag.ends_with('/') {
            let text = rest.split('<').next().unwrap_or("");
            return text.trim() == "true";
        }
    }
    false
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Errors

/// A Salesforce REST error: status plus one `{errorCode, message[, fields]}`.
#[derive(Debug)]
struct SfError {
    status: StatusCode,
    code: &'static str,
    message: String,
    fields: Option<Vec<String>>,
}

impl SfError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            fields: None,
        }
    }

    fn with_fields(mut self, fields: &[&str]) -> Self {
        self.fields = Some(fields.iter().map(|f| (*f).to_owned()).collect());
        self
    }

    fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        )
    }

    fn deleted() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ENTITY_IS_DELETED",
            "entity is deleted",
        )
        .with_fields(&[])
    }

    fn malformed_query(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", message)
    }
}

impl IntoResponse for SfError {
    fn into_response(self) -> Response {
        let mut body = json!({ "message": self.message, "errorCode": self.code });
        if let Some(fields) = self.fields {
            body["fields"] = json!(fields);
        }
        (self.status, axum::Json(json!([body]))).into_response()
    }
}

// ---------------------------------------------------------------------------
// Records

/// Looks up a record of `object` by 15- or 18-character id; returns its
/// 18-character id.
fn find<'a>(data: &'a Data, object: &str, id: &str) -> Result<(String, &'a StoredRecord), SfError> {
    let id = if id.len() == 15 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        format!("{id}{}", id_suffix(id))
    } else {
        id.to_owned()
    };
    match data.records.get(&id) {
        Some(rec) if rec.object.eq_ignore_ascii_case(object) => Ok((id, rec)),
        // A record id of another object is read as a value of an external
        // id field named by the segment before it, which is not one.
        Some(_) => Err(SfError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("Provided external ID field does not exist or is not accessible: {id}"),
        )),
        None => Err(SfError::not_found()),
    }
}

/// The canonical spelling of writable field `name` on `object`, or the
/// error Salesforce gives for it.
fn writable_field(object: &str, name: &str) -> Result<String, SfError> {
    if let Some(system) = SYSTEM_FIELDS.iter().find(|f| f.eq_ignore_ascii_case(name)) {
        return Err(SfError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD_FOR_INSERT_UPDATE",
            format!(
                "Unable to create/update fields: {system}. Please check the security settings \
                 of this field and verify that it is read/write for your profile or permission set."
            ),
        )
        .with_fields(&[system]));
    }
    readable_field(object, name)
}

/// The canonical spelling of field `name` on `object` (system fields
/// included), or `INVALID_FIELD`.
fn readable_field(object: &str, name: &str) -> Result<String, SfError> {
    // Only the objects Salesforce merges have it ("Merging Records"); a
    // custom object's query of it is refused.
    let merged = ["Contact", "Account", "Lead"].contains(&object);
    if let Some(system) = SYSTEM_FIELDS
        .iter()
        .find(|f| f.eq_ignore_ascii_case(name))
        .filter(|f| merged || **f != "MasterRecordId")
    {
        return Ok((*system).to_owned());
    }
    if !merged && name.eq_ignore_ascii_case("MasterRecordId") {
        return Err(SfError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            format!("No such column '{name}' on sobject of type {object}"),
        ));
    }
    if object != "Contact" {
        return Ok(name.to_owned());
    }
    if let Some(known) = CONTACT_FIELDS.iter().find(|f| f.eq_ignore_ascii_case(name)) {
        return Ok((*known).to_owned());
    }
    if name.len() > 3 && name.to_ascii_lowercase().ends_with("__c") {
        return Ok(name.to_owned());
    }
    Err(SfError::new(
        StatusCode::BAD_REQUEST,
        "INVALID_FIELD",
        format!("No such column '{name}' on sobject of type {object}"),
    ))
}

fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.chars().any(char::is_whitespace)
}

fn is_blank(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty(),
        Some(_) => false,
    }
}

/// Merges `body` into `fields` after checking it the way Salesforce does
/// for `object`. `attributes` in a body is ignored, as Salesforce does.
/// A standard text field's length, in characters, as the Object Reference
/// gives it (Contact, Account and Lead: the fields a sync writes). A
/// longer value refuses the whole write, `STRING_TOO_LONG` naming the
/// field (the REST API truncates nothing unless asked to, which ferry
/// does not).
fn max_length(object: &str, field: &str) -> Option<usize> {
    const CONTACT: &[(&str, usize)] = &[
        ("FirstName", 40),
        ("LastName", 80),
        ("Email", 80),
        ("Phone", 40),
        ("MobilePhone", 40),
        ("Title", 128),
        ("MailingStreet", 255),
        ("MailingCity", 40),
        ("MailingState", 80),
        ("MailingPostalCode", 20),
        ("MailingCountry", 80),
    ];
    const ACCOUNT: &[(&str, usize)] = &[
        ("Name", 255),
        ("Phone", 40),
        ("Website", 255),
        ("BillingStreet", 255),
        ("BillingCity", 40),
        ("BillingState", 80),
        ("BillingPostalCode", 20),
        ("BillingCountry", 80),
        ("ShippingStreet", 255),
        ("ShippingCity", 40),
        ("ShippingState", 80),
        ("ShippingPostalCode", 20),
        ("ShippingCountry", 80),
    ];
    const LEAD: &[(&str, usize)] = &[
        ("FirstName", 40),
        ("LastName", 80),
        ("Company", 255),
        ("Email", 80),
        ("Phone", 40),
        ("Street", 255),
        ("City", 40),
        ("State", 80),
        ("PostalCode", 20),
        ("Country", 80),
    ];
    let fields = match object {
        "Contact" => CONTACT,
        "Account" => ACCOUNT,
        "Lead" => LEAD,
        _ => return None,
    };
    fields
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(field))
        .map(|(_, max)| *max)
}

fn apply_fields(
    object: &str,
    fields: &mut Map<String, Value>,
    body: &Value,
) -> Result<(), SfError> {
    let Value::Object(body) = body else {
        return Err(SfError::new(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "Cannot deserialize instance of SObject from a non-object JSON value",
        ));
    };
    let mut merged = fields.clone();
    for (name, value) in body {
        if name == "attributes" {
            continue;
        }
        let name = writable_field(object, name)?;
        if let (Some(max), Some(text)) = (max_length(object, &name), value.as_str()) {
            let length = text.chars().count();
            if length > max {
                return Err(SfError::new(
                    StatusCode::BAD_REQUEST,
                    "STRING_TOO_LONG",
                    format!("{name}: data value too large: {text} (max length={max})"),
                )
                .with_fields(&[name.as_str()]));
            }
        }
        // One field whatever the case it is written in: the spelling it
        // was first written in stays (Salesforce's field names ignore
        // case; a second key held a stale value beside the first).
        let name = merged
            .keys()
            .find(|k| k.eq_ignore_ascii_case(&name))
            .cloned()
            .unwrap_or(name);
        if value.is_null() {
            merged.remove(&name);
        } else {
            merged.insert(name, value.clone());
        }
    }
    // Standard objects with a required Name field (a custom object's text
    // Name is required too, but the fake serves standard objects only).
    if object == "Account" && is_blank(merged.get("Name")) {
        return Err(SfError::new(
            StatusCode::BAD_REQUEST,
            "REQUIRED_FIELD_MISSING",
            "Required fields are missing: [Name]",
        )
        .with_fields(&["Name"]));
    }
    if object == "Contact" {
        if is_blank(merged.get("LastName")) {
            return Err(SfError::new(
                StatusCode::BAD_REQUEST,
                "REQUIRED_FIELD_MISSING",
                "Required fields are missing: [LastName]",
            )
            .with_fields(&["LastName"]));
        }
        if let Some(email) = merged.get("Email") {
            let text = email.as_str().unwrap_or_default();
            if !is_email(text) {
                return Err(SfError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALID_EMAIL_ADDRESS",
                    format!("Email: invalid email address: {text}"),
                )
                .with_fields(&["Email"]));
            }
        }
    }
    *fields = merged;
    Ok(())
}

/// Now, as Salesforce dates a record: `CreatedDate`, `LastModifiedDate`
/// and `SystemModstamp` hold whole seconds (`….000+0000`), so two edits
/// within a second carry the same date, and ferry's rule for dates of
/// equal seconds (read the record again) is what runs against the fake.
fn stamp_now() -> String {
    let millis = i64::try_from(now_millis()).unwrap_or(i64::MAX);
    format_datetime(millis - millis.rem_euclid(1000))
}

fn create_record(shared: &Shared, object: &str, body: &Value) -> Result<String, SfError> {
    let object = canonical_object(object);
    let mut fields = Map::new();
    apply_fields(&object, &mut fields, body)?;
    let now = stamp_now();
    let mut data = shared.data();
    let id = make_id(key_prefix(&object), data.next_seq());
    data.records.insert(
        id.clone(),
        StoredRecord {
            object,
            fields,
            created: now.clone(),
            modified: now,
            deleted: false,
            master: None,
        },
    );
    Ok(id)
}

fn update_record(shared: &Shared, object: &str, id: &str, body: &Value) -> Result<(), SfError> {
    let mut data = shared.data();
    let (id, rec) = find(&data, object, id)?;
    if rec.deleted {
        return Err(SfError::deleted());
    }
    let mut fields = rec.fields.clone();
    let object = rec.object.clone();
    apply_fields(&object, &mut fields, body)?;
    if let Some(rec) = data.records.get_mut(&id) {
        rec.fields = fields;
        rec.modified = stamp_now();
    }
    Ok(())
}

fn delete_record(shared: &Shared, object: &str, id: &str) -> Result<(), SfError> {
    let mut data = shared.data();
    let (id, rec) = find(&data, object, id)?;
    if rec.deleted {
        return Err(SfError::deleted());
    }
    if let Some(rec) = data.records.get_mut(&id) {
        rec.deleted = true;
        rec.modified = stamp_now();
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// HTTP

fn record_request(shared: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) {
    let request = RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(body).into_owned(),
    };
    shared.data().requests.push(request);
}

/// Routes by hand rather than with axum routes: every request is recorded
/// in one place, and Salesforce's optional trailing slashes and version
/// prefix are easier to match on segments.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record_request(&shared, &method, &uri, &headers, &body);
    let path = uri.path();
    if path == "/services/oauth2/token" {
        if method != Method::POST {
            return StatusCode::METHOD_NOT_ALLOWED.into_response();
        }
        return token(&shared, &body);
    }
    let Some(rest) = path.strip_prefix("/services/data/") else {
        return SfError::not_found().into_response();
    };
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    // A version newer than the org runs (a sandbox a release ahead, a
    // typo) is not there: 404 `NOT_FOUND`, as for any unknown resource.
    if !is_api_version(version) || newer_than_served(version) {
        return SfError::not_found().into_response();
    }
    // Versions 21.0 to 30.0 were retired in Summer '25: Salesforce answers
    // a request under one with 410 GONE (its API end-of-life notice).
    if retired(version) {
        return StatusCode::GONE.into_response();
    }
    match data_api(
        &shared,
        &method,
        version,
        rest,
        uri.query(),
        &headers,
        &body,
    ) {
        Ok(resp) => resp,
        Err(err) => err.into_response(),
    }
}

/// Whether API version `v` (`vNN.N`) is one Salesforce has retired.
fn retired(v: &str) -> bool {
    v.strip_prefix('v')
        .and_then(|n| n.split_once('.'))
        .and_then(|(major, _)| major.parse::<u32>().ok())
        .is_some_and(|major| major <= 30)
}

/// The newest API version the fake serves: Winter '27's.
const NEWEST_API_VERSION: u32 = 68;

/// Whether API version `v` (`vNN.N`) is newer than the org runs.
fn newer_than_served(v: &str) -> bool {
    v.strip_prefix('v')
        .and_then(|n| n.split_once('.'))
        .and_then(|(major, _)| major.parse::<u32>().ok())
        .is_some_and(|major| major > NEWEST_API_VERSION)
}

fn is_api_version(v: &str) -> bool {
    v.strip_prefix('v')
        .and_then(|n| n.split_once('.'))
        .is_some_and(|(major, minor)| {
            !major.is_empty()
                && !minor.is_empty()
                && major.bytes().all(|b| b.is_ascii_digit())
                && minor.bytes().all(|b| b.is_ascii_digit())
        })
}

fn token(shared: &Shared, body: &Bytes) -> Response {
    let oauth_error = |error: &str, description: &str| {
        let body = json!({ "error": error, "error_description": description });
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    };
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let param = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if param("grant_type") != Some("client_credentials") {
        return oauth_error("unsupported_grant_type", "grant type not supported");
    }
    let cfg = &shared.cfg;
    if param("client_id") != Some(cfg.client_id.as_str())
        || param("client_secret") != Some(cfg.client_secret.as_str())
    {
        return oauth_error("invalid_client", "invalid client credentials");
    }
    let org15 = cfg.org_id.get(..15).unwrap_or(&cfg.org_id);
    let access_token = format!(
        "{org15}!AQ{:016x}{:016x}{:016x}",
        random_u64(),
        random_u64(),
        random_u64()
    );
    let signature = format!("{:016x}{:016x}", random_u64(), random_u64());
    {
        let mut data = shared.data();
        data.tokens.insert(access_token.clone());
        data.counts.token_requests += 1;
    }
    let base = &shared.base_url;
    axum::Json(json!({
        "access_token": access_token,
        "signature": signature,
        "scope": "api",
        "instance_url": base,
        "id": format!("{base}/id/{}/{USER_ID}", cfg.org_id),
        "token_type": "Bearer",
        "issued_at": now_millis().to_string(),
    }))
    .into_response()
}

fn check_session(shared: &Shared, headers: &HeaderMap) -> Result<(), SfError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("Bearer") || scheme.eq_ignore_ascii_case("OAuth")
        })
        .map(|(_, token)| token.trim());
    let mut data = shared.data();
    if !token.is_some_and(|t| data.tokens.contains(t)) {
        return Err(SfError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        ));
    }
    if data.unavailable {
        return Err(SfError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_UNAVAILABLE",
            "The server is unavailable to handle the request.",
        ));
    }
    if data.limit_failures > 0 {
        data.limit_failures -= 1;
        return Err(SfError::new(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            "ConcurrentPerOrgLongTxn Limit exceeded.",
        ));
    }
    Ok(())
}

fn data_api(
    shared: &Shared,
    method: &Method,
    version: &str,
    rest: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, SfError> {
    check_session(shared, headers)?;
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let params: Vec<(String, String)> = query
        .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
        .unwrap_or_default();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let ["sobjects", object, ..] = segments.as_slice() {
        if !known_object(object) {
            return Err(SfError::not_found());
        }
    }
    match (method, segments.as_slice()) {
        // sObject Basic Information: what the object is.
        (&Method::GET, ["sobjects", object]) => {
            let object = canonical_object(object);
            let reply = json!({
                "objectDescribe": {
                    "name": object,
                    "keyPrefix": key_prefix(&object),
                    "custom": object.ends_with("__c"),
                    "createable": true,
                    "queryable": true,
                    "urls": {"sobject": format!("/services/data/{version}/sobjects/{object}")},
                },
                "recentItems": [],
            });
            Ok(axum::Json(reply).into_response())
        }
        (&Method::POST, ["sobjects", object]) => {
            let body = parse_json(body)?;
            let id = create_record(shared, object, &body)?;
            shared.data().counts.creates += 1;
            let reply = json!({ "id": id, "success": true, "errors": [] });
            Ok((StatusCode::CREATED, axum::Json(reply)).into_response())
        }
        (&Method::GET, ["sobjects", object, id]) => {
            let mut data = shared.data();
            let (id, rec) = find(&data, object, id)?;
            if rec.deleted {
                return Err(SfError::deleted());
            }
            let full = rec.full(&id);
            let mut out = Map::new();
            out.insert(
                "attributes".to_owned(),
                attributes(version, &rec.object, &id),
            );
            match param("fields") {
                Some(list) => {
                    out.insert("Id".to_owned(), Value::String(id.clone()));
                    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                        let name = readable_field(&rec.object, name)?;
                        out.insert(name.clone(), rec.get(&id, &name));
                    }
                }
                None => out.extend(full),
            }
            data.counts.retrieves += 1;
            Ok(axum::Json(Value::Object(out)).into_response())
        }
        (&Method::PATCH, ["sobjects", object, id]) => {
            let body = parse_json(body)?;
            update_record(shared, object, id, &body)?;
            shared.data().counts.updates += 1;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (&Method::DELETE, ["sobjects", object, id]) => {
            delete_record(shared, object, id)?;
            shared.data().counts.deletes += 1;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (&Method::GET, [verb @ ("query" | "queryAll")]) => {
            let soql = param("q")
                .ok_or_else(|| SfError::malformed_query("A query string has to be specified"))?;
            let page_size = shared
                .cfg
                .query_page_size
                .unwrap_or_else(|| batch_size(headers))
                .max(1);
            let rows = run_query(shared, version, soql, *verb == "queryAll")?;
            let mut data = shared.data();
            data.counts.queries += 1;
            let locator = make_id("01g", data.next_seq());
            Ok(page(
                &mut data,
                version,
                locator,
                Cursor { rows, page_size },
                0,
            ))
        }
        (&Method::GET, ["query", locator]) => {
            let (base, offset) = locator
                .rsplit_once('-')
                .and_then(|(b, o)| Some((b, o.parse::<usize>().ok()?)))
                .ok_or_else(invalid_locator)?;
            let mut data = shared.data();
            let cursor = data.cursors.remove(base).ok_or_else(invalid_locator)?;
            if offset > cursor.rows.len() {
                data.cursors.insert(base.to_owned(), cursor);
                return Err(invalid_locator());
            }
            data.counts.query_pages += 1;
            Ok(page(&mut data, version, base.to_owned(), cursor, offset))
        }
        (_, ["sobjects", _, _] | ["sobjects", _] | ["query", ..]) => Err(SfError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            format!("HTTP Method '{method}' not allowed"),
        )),
        _ => Err(SfError::not_found()),
    }
}

fn invalid_locator() -> SfError {
    SfError::new(
        StatusCode::BAD_REQUEST,
        "INVALID_QUERY_LOCATOR",
        "invalid query locator",
    )
}

fn parse_json(body: &Bytes) -> Result<Value, SfError> {
    serde_json::from_slice(body)
        .map_err(|e| SfError::new(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", e.to_string()))
}

fn attributes(version: &str, object: &str, id: &str) -> Value {
    json!({
        "type": object,
        "url": format!("/services/data/{version}/sobjects/{object}/{id}"),
    })
}

/// `Sforce-Query-Options: batchSize=N`, clamped as Salesforce does.
fn batch_size(headers: &HeaderMap) -> usize {
    headers
        .get("sforce-query-options")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("batchSize"))
                .and_then(|(_, n)| n.trim().parse::<usize>().ok())
        })
        .map_or(2000, |n| n.clamp(200, 2000))
}

/// Answers one page of `cursor` from `offset`, keeping the cursor if rows
/// remain.
fn page(
    data: &mut Data,
    version: &str,
    locator: String,
    cursor: Cursor,
    offset: usize,
) -> Response {
    let end = (offset + cursor.page_size).min(cursor.rows.len());
    let done = end >= cursor.rows.len();
    let mut body = json!({
        "totalSize": cursor.rows.len(),
        "done": done,
        "records": cursor.rows[offset..end].to_vec(),
    });
    if !done {
        body["nextRecordsUrl"] = json!(format!("/services/data/{version}/query/{locator}-{end}"));
        data.cursors.insert(locator, cursor);
    }
    axum::Json(body).into_response()
}

/// `soql`'s rows; deleted records too when `all` (`queryAll`).
fn run_query(shared: &Shared, version: &str, soql: &str, all: bool) -> Result<Vec<Value>, SfError> {
    let query = parse_soql(soql)?;
    if !known_object(&query.object) {
        return Err(SfError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_TYPE",
            format!("sObject type '{}' is not supported.", query.object),
        ));
    }
    let object = canonical_object(&query.object);
    let select = query
        .fields
        .iter()
        .map(|f| readable_field(&object, f))
        .collect::<Result<Vec<_>, _>>()?;
    let conditions = query
        .conditions
        .into_iter()
        .map(|mut c| {
            c.field = readable_field(&object, &c.field)?;
            if c.field == "Id" {
                if let Literal::Text(id) = &c.value {
                    if id.len() == 15 {
                        c.value = Literal::Text(format!("{id}{}", id_suffix(id)));
                    }
                }
            }
            Ok(c)
        })
        .collect::<Result<Vec<_>, SfError>>()?;
    let order_by = query
        .order_by
        .map(|(f, asc)| readable_field(&object, &f).map(|f| (f, asc)))
        .transpose()?;
    let data = shared.data();
    let mut hits: Vec<(&String, &StoredRecord)> = data
        .records
        .iter()
        .filter(|(_, r)| (all || !r.deleted) && r.object.eq_ignore_ascii_case(&object))
        .filter(|(id, r)| {
            conditions
                .iter()
                .all(|c| matches(c, &lookup(r, id, &c.field)))
        })
        .collect();
    if let Some((field, ascending)) = &order_by {
        // Salesforce sorts nulls first ascending and last descending.
        hits.sort_by_key(|(id, r)| comparable(&lookup(r, id, field)));
        if !ascending {
            hits.reverse();
        }
    }
    if let Some(limit) = query.limit {
        hits.truncate(limit);
    }
    if let Some(cap) = data.query_cap {
        hits.truncate(cap);
    }
    Ok(hits
        .into_iter()
        .map(|(id, rec)| {
            let mut row = Map::new();
            row.insert(
                "attributes".to_owned(),
                attributes(version, &rec.object, id),
            );
            for field in &select {
                row.insert(field.clone(), lookup(rec, id, field));
            }
            Value::Object(row)
        })
        .collect())
}

/// Field `name` of a record, matching stored custom field names
/// case-insensitively.
fn lookup(rec: &StoredRecord, id: &str, name: &str) -> Value {
    if SYSTEM_FIELDS.contains(&name) {
        return rec.get(id, name);
    }
    rec.fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or(Value::Null, |(_, v)| v.clone())
}

#[cfg(test)]
mod tests;
