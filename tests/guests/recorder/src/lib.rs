//! A connector for tests: records every push at a tiny HTTP service.
//!
//! It stands in for a second remote system (until a real one such as
//! Salesforce lands) so the fan-out tests can watch a change travel from one
//! connector to another. It is written on `ferry-sdk` exactly as a third
//! party would write a connector, and speaks a deliberately plain protocol
//! to whatever listens at setting `api_base`:
//!
//! | push | request | answer |
//! |---|---|---|
//! | create | `POST {api_base}/records` | `{"id": "rec_…"}`: the remote id |
//! | update | `PUT {api_base}/records/{id}` | any 2xx |
//! | delete | `DELETE {api_base}/records/{id}` | any 2xx (404: already gone) |
//!
//! Creates and updates carry `{"local_id", "version", "idempotency_key",
//! "record"}` as JSON, `record` being ferry's canonical customer, and the
//! same key as an `Idempotency-Key` header. HTTP 429,
//! 5xx and 4xx answers become the typed errors the host's retry policy
//! expects. With setting `send_api_key` = `true`, secret `api_key` goes out
//! as a bearer token. `list` reads `GET {api_base}/records?after=…&limit=…`
//! (`{"records": [{"id", "record"}], "next": id or null}`); its cursor
//! names the version that made it (`v0.1.0:rec_…`), and a version refuses
//! another's cursor, as a connector whose cursor format changed would. No
//! fetch.
//!
//! Its webhook endpoint misbehaves on demand, for the host's bad-path tests:
//! a body of `trap` traps, `loop` spins until the host's deadline stops it.
//! A JSON body `{"id": "evt_…", "remote_id": "rec_…", "record": {…}}`
//! becomes one upsert event; anything else parses to no events. Every
//! answer's body is `recorder VERSION`, so a test sees which version served
//! it.
//!
//! Features build variants of it for the connector-plane tests (each is one
//! more file beside the default build, see `scripts/build-connectors.sh`):
//! `version-2` is version 0.2.0, `version-3` is version 0.3.0 with a new
//! required setting `account`, `rebuilt` is the default version with other
//! bytes, `invalid-manifest` declares a name and version ferry refuses,
//! `no-customer` is version 0.4.0 syncing `invoice` instead of `customer`,
//! `version-5` is version 0.5.0 with 0.3.0's `account` renamed
//! `account_number`.

use ferry_sdk::http::{Request, Response};
use ferry_sdk::{
    clock, settings, Connector, ConnectorError, Event, Manifest, Operation, Page, ParsedWebhook,
    PushRequest, PushResult, RemoteRecord, WebhookRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const ENTITY: &str = "customer";
/// The discard port on loopback: an unconfigured recorder fails fast with
/// "connection refused" instead of calling anything real.
const DEFAULT_API_BASE: &str = "http://127.0.0.1:9";

/// The manifest's name and version.
const NAME: &str = if cfg!(feature = "invalid-manifest") {
    "Recorder!"
} else {
    "recorder"
};
const VERSION: &str = if cfg!(feature = "invalid-manifest") {
    "latest"
} else if cfg!(feature = "version-2") {
    "0.2.0"
} else if cfg!(feature = "version-3") {
    "0.3.0"
} else if cfg!(feature = "no-customer") {
    "0.4.0"
} else if cfg!(feature = "version-5") {
    "0.5.0"
} else {
    env!("CARGO_PKG_VERSION")
};
const DESCRIPTION: &str = if cfg!(feature = "rebuilt") {
    "Test connector: records every customer push at an HTTP service (rebuilt)"
} else {
    "Test connector: records every customer push at an HTTP service"
};

struct Recorder;

/// A webhook body that carries one event.
#[derive(Deserialize)]
struct Delivery {
    id: String,
    remote_id: String,
    #[serde(default)]
    record: Option<Value>,
    /// The record's text as the connector hands it to ferry, as is (a
    /// broken connector's, for the tests).
    #[serde(default)]
    raw_record: Option<String>,
}

impl Connector for Recorder {
    fn manifest() -> Manifest {
        let builder = Manifest::builder(NAME, VERSION);
        let builder = if cfg!(feature = "version-3") {
            builder.setting(
                "account",
                "The recording service's account (new in 0.3.0, required)",
                None,
                true,
            )
        } else if cfg!(feature = "version-5") {
            builder.setting(
                "account_number",
                "The recording service's account (0.3.0's `account`, renamed in 0.5.0)",
                None,
                true,
            )
        } else {
            builder
        };
        let builder = builder.description(DESCRIPTION);
        let builder = if cfg!(feature = "no-customer") {
            builder.entity("invoice")
        } else {
            builder.entity(ENTITY)
        };
        let builder = builder
            .base_url_setting(
                "api_base",
                "Base URL of the recording service",
                DEFAULT_API_BASE,
            )
            .setting(
                "send_api_key",
                "`true` to send secret `api_key` as a bearer token",
                Some("false"),
                false,
            )
            .secret("api_key", "Token for the recording service", false);
        // A version for invoices alone takes no webhooks either.
        let builder = if cfg!(feature = "no-customer") {
            builder
        } else {
            builder.webhooks()
        };
        builder.build()
    }

    fn verify_webhook(req: WebhookRequest) -> Result<(), ConnectorError> {
        match req.body.as_slice() {
            b"trap" => std::process::abort(),
            b"loop" => loop {
                std::hint::spin_loop();
            },
            _ => Ok(()),
        }
    }

    fn parse_webhook(req: WebhookRequest) -> Result<ParsedWebhook, ConnectorError> {
        // One delivery, or a batch of them in an array.
        let deliveries = serde_json::from_slice::<Delivery>(&req.body)
            .map(|delivery| vec![delivery])
            .or_else(|_| serde_json::from_slice::<Vec<Delivery>>(&req.body))
            .unwrap_or_default();
        let now = clock::now_ms();
        let events = deliveries
            .into_iter()
            .map(|delivery| {
                Event::upsert(
                    delivery.id,
                    ENTITY,
                    delivery.remote_id,
                    now,
                    delivery
                        .raw_record
                        .or_else(|| delivery.record.map(|r| r.to_string())),
                )
            })
            .collect();
        Ok(ParsedWebhook::events(events).with_reply("text/plain", format!("recorder {VERSION}")))
    }

    fn push(req: PushRequest) -> Result<PushResult, ConnectorError> {
        if req.entity != ENTITY {
            return Err(ConnectorError::unsupported(format!(
                "the recorder does not handle `{}`",
                req.entity
            )));
        }
        match req.operation {
            Operation::Create => {
                let body = Body::of(&req)?;
                let request = Request::post(format!("{}/records", api_base()))
                    .header("idempotency-key", &req.idempotency_key)
                    .json(&body)?;
                let resp = send(request)?;
                let created: Created = resp.json()?;
                if created.id.is_empty() {
                    return Err(ConnectorError::permanent(
                        "the recording service answered a create without an id",
                    ));
                }
                Ok(PushResult::new(created.id))
            }
            Operation::Update => {
                let id = linked_id(&req)?;
                let body = Body::of(&req)?;
                send(
                    Request::put(record_url(id))
                        .header("idempotency-key", &req.idempotency_key)
                        .json(&body)?,
                )?;
                Ok(PushResult::new(id))
            }
            Operation::Delete => {
                let id = linked_id(&req)?;
                send(Request::delete(record_url(id)))?;
                Ok(PushResult::new(id))
            }
        }
    }

    fn list(entity: String, cursor: Option<String>, limit: u32) -> Result<Page, ConnectorError> {
        ferry_sdk::ensure_entity(&entity, ENTITY, "recorder")?;
        let prefix = format!("v{VERSION}:");
        let after = match cursor.as_deref() {
            None => None,
            Some(cursor) => Some(cursor.strip_prefix(&prefix).ok_or_else(|| {
                ConnectorError::permanent(format!(
                    "cursor `{cursor}` is not one of version {VERSION}'s"
                ))
            })?),
        };
        let limit = limit.to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(after) = after {
            query.push(("after", after));
        }
        let req = Request::get(format!("{}/records", api_base())).query(&query)?;
        let listed: Listed = send(req)?.json()?;
        let records = listed
            .records
            .into_iter()
            .map(|listed| RemoteRecord::new(listed.id, listed.record.to_string()))
            .collect();
        Ok(Page::new(
            records,
            listed.next.map(|next| format!("{prefix}{next}")),
        ))
    }
}

ferry_sdk::export_connector!(Recorder);

/// What a create or update sends.
#[derive(Serialize)]
struct Body<'a> {
    local_id: &'a str,
    version: u64,
    idempotency_key: &'a str,
    record: Value,
}

impl<'a> Body<'a> {
    /// Nests the record as JSON (not a string), so the service can read it;
    /// a record that is not JSON is ferry's bug and will not parse on retry.
    fn of(req: &'a PushRequest) -> Result<Self, ConnectorError> {
        Ok(Self {
            local_id: &req.local_id,
            version: req.version,
            idempotency_key: &req.idempotency_key,
            record: serde_json::from_str(&req.record)?,
        })
    }
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

/// A page of `GET /records`.
#[derive(Deserialize)]
struct Listed {
    records: Vec<ListedRecord>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct ListedRecord {
    id: String,
    record: Value,
}

fn linked_id(req: &PushRequest) -> Result<&str, ConnectorError> {
    req.remote_id
        .as_deref()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            ConnectorError::permanent(format!(
                "customer {} has no recorder id to update or delete",
                req.local_id
            ))
        })
}

fn api_base() -> String {
    settings::base_url("api_base", DEFAULT_API_BASE)
}

fn record_url(id: &str) -> String {
    format!("{}/records/{}", api_base(), path_segment(id))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a remote
/// id cannot change the path it is put in.
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Adds the bearer token when configured, sends, and maps a non-2xx answer
/// onto the typed error (429 → rate-limited, 5xx → retryable, 4xx →
/// permanent / unauthorized / not-found).
fn send(req: Request) -> Result<Response, ConnectorError> {
    let req = if settings::get("send_api_key").as_deref() == Some("true") {
        req.bearer_secret("api_key")
    } else {
        req
    };
    req.send()?.error_for_status()
}
