//! A connector that misbehaves on request, for ferry's sandbox tests.
//!
//! `push` reads an instruction from its `record` JSON, e.g. `{"do":"loop"}`:
//!
//! - `ok`: succeed at once;
//! - `loop`: spin forever (the deadline must stop it);
//! - `alloc`: allocate without end (the memory cap must stop it);
//! - `stack`: recurse without end;
//! - `trap`: hit `unreachable`;
//! - `http` with `url`: send a request carrying `{{secret:api_key}}` in a
//!   header and the body, and report what came back (status, body, headers,
//!   or the error), so a test sees exactly what the guest saw; `headers`
//!   (an object) adds headers of its own, `body_bytes` sends that many
//!   bytes as the body instead;
//! - `hmac` with `secret`: HMAC `"message"` with that secret name;
//! - `setting` with `name`: read a setting;
//! - `print` with `count`: write that many lines to stdout;
//! - `handles` with `count`: ask WASI for that many timers and never drop
//!   them (each a handle in the host's resource table);
//! - `huge`: answer with a record of 2 MiB.
//!
//! `fetch` of `huge` and `list` from cursor `huge` read a record of 2 MiB;
//! `list` from cursor `over` answers one record more than its limit.
//!
//! It declares host `api.example.com`, host setting `api_base` and secret
//! `api_key`.

//! It is built against the OLDEST supported world, `ferry:connector@0.1.0`,
//! on purpose: the sandbox tests that run it also prove that a component
//! built against an old version of the contract still loads and runs.

#![allow(unsafe_code)] // wit-bindgen's generated glue

wit_bindgen::generate!({
    path: "../../../wit/since_v0.1.0",
    world: "connector",
});

use std::hint::black_box;

use exports::ferry::connector::handler::{
    ConnectorError, Guest, Manifest, Page, ParsedWebhook, PushRequest, PushResult, RemoteRecord,
    SecretSpec, SettingSpec, WebhookRequest,
};
use ferry::connector::{crypto, http, settings};
use serde_json::{json, Value};

struct Hostile;

impl Guest for Hostile {
    fn get_manifest() -> Manifest {
        Manifest {
            name: "hostile".into(),
            version: "0.1.0".into(),
            description: "Misbehaves on request".into(),
            entities: vec!["customer".into()],
            hosts: vec!["api.example.com".into()],
            host_settings: vec!["api_base".into()],
            settings: vec![SettingSpec {
                name: "api_base".into(),
                description: "Base URL; its host counts as declared".into(),
                default: None,
                required: false,
            }],
            secrets: vec![SecretSpec {
                name: "api_key".into(),
                description: "API key".into(),
                required: true,
            }],
            webhooks: false,
        }
    }

    fn verify_webhook(_req: WebhookRequest) -> Result<(), ConnectorError> {
        Ok(())
    }

    fn parse_webhook(_req: WebhookRequest) -> Result<ParsedWebhook, ConnectorError> {
        Ok(ParsedWebhook {
            events: Vec::new(),
            reply: None,
        })
    }

    fn push(req: PushRequest) -> Result<PushResult, ConnectorError> {
        let instruction: Value = serde_json::from_str(&req.record)
            .map_err(|e| ConnectorError::Permanent(e.to_string()))?;
        let text = |key: &str| instruction[key].as_str().unwrap_or_default().to_owned();
        let report = |value: Value| {
            Ok(PushResult {
                remote_id: req.local_id.clone(),
                record: Some(value.to_string()),
            })
        };
        match text("do").as_str() {
            "ok" => Ok(PushResult {
                remote_id: req.local_id.clone(),
                record: None,
            }),
            "loop" => {
                let mut i = 0u64;
                loop {
                    i = black_box(i.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    black_box(&hoard);
                }
            }
            "stack" => report(json!(recurse(black_box(1)))),
            "huge" => Ok(huge_record(req.local_id.clone())).map(|r| PushResult {
                remote_id: r.remote_id,
                record: Some(r.record),
            }),
            // `abort` is the `unreachable` instruction on wasm32 (and still
            // compiles for the native clippy/test builds of the workspace).
            "trap" => std::process::abort(),
            "http" => {
                let mut headers =
                    vec![("authorization".into(), "Bearer {{secret:api_key}}".into())];
                if let Some(extra) = instruction["headers"].as_object() {
                    for (name, value) in extra {
                        headers.push((name.clone(), value.as_str().unwrap_or_default().into()));
                    }
                }
                let request = http::Request {
                    method: http::Method::Post,
                    url: text("url"),
                    headers,
                    body: Some(match instruction["body_bytes"].as_u64() {
                        Some(n) => vec![b'x'; usize::try_from(n).unwrap_or(0)],
                        None => b"key={{secret:api_key}}".to_vec(),
                    }),
                    timeout_ms: None,
                };
                match http::send(&request) {
                    Ok(r) => report(json!({
                        "status": r.status,
                        "body": String::from_utf8_lossy(&r.body),
                        "headers": r.headers,
                    })),
                    // Given up as transient, as a connector does when its
                    // request times out.
                    Err(e) if instruction["give_up"] == true => {
                        Err(ConnectorError::Retryable(format!("{e:?}")))
                    }
                    Err(e) => report(json!({ "error": format!("{e:?}") })),
                }
            }
            "hmac" => match crypto::hmac_sha256(&text("secret"), b"message") {
                Ok(mac) => report(json!({ "mac": mac })),
                Err(e) => report(json!({ "error": e })),
            },
            "setting" => report(json!({ "value": settings::get(&text("name")) })),
            "print" => {
                let lines = instruction["count"].as_u64().unwrap_or(1);
                for n in 0..lines {
                    println!("line {n}");
                }
                report(json!({ "printed": lines }))
            }
            "handles" => {
                let count = instruction["count"].as_u64().unwrap_or(1);
                for _ in 0..count {
                    black_box(subscribe_duration(1));
                }
                report(json!({ "held": count }))
            }
            "random" => {
                let len = instruction["len"].as_u64().unwrap_or(16);
                report(json!({ "random": random_bytes(len) }))
            }
            other => Err(ConnectorError::Unsupported(format!(
                "unknown instruction `{other}`"
            ))),
        }
    }

    /// `huge`: a record of 2 MiB; `array`: a record that is no object.
    fn fetch(entity: String, remote_id: String) -> Result<RemoteRecord, ConnectorError> {
        match remote_id.as_str() {
            "huge" => Ok(huge_record(remote_id)),
            "array" => Ok(RemoteRecord {
                remote_id,
                record: "[]".into(),
                updated_at_ms: None,
            }),
            _ => Err(ConnectorError::Unsupported(format!("fetch {entity}"))),
        }
    }

    /// Cursor `over`: one record more than `limit`; `huge`: a record of
    /// 2 MiB; `null`: a record that is no object.
    fn list(entity: String, cursor: Option<String>, limit: u32) -> Result<Page, ConnectorError> {
        let records = match cursor.as_deref() {
            Some("over") => (0..=limit)
                .map(|n| RemoteRecord {
                    remote_id: format!("r{n}"),
                    record: "{}".into(),
                    updated_at_ms: None,
                })
                .collect(),
            Some("huge") => vec![huge_record("r0".into())],
            Some("null") => vec![RemoteRecord {
                remote_id: "r0".into(),
                record: "null".into(),
                updated_at_ms: None,
            }],
            _ => return Err(ConnectorError::Unsupported(format!("list {entity}"))),
        };
        Ok(Page {
            records,
            next_cursor: None,
        })
    }
}

fn huge_record(remote_id: String) -> RemoteRecord {
    RemoteRecord {
        remote_id,
        record: json!({ "name": "x".repeat(2 << 20) }).to_string(),
        updated_at_ms: None,
    }
}

// WASI's timer, imported by hand: the sandbox must bound what a guest keeps
// in the host's resource table, whatever bindings it was built with.
#[cfg(target_arch = "wasm32")]
fn subscribe_duration(nanos: u64) -> i32 {
    #[link(wasm_import_module = "wasi:clocks/monotonic-clock@0.2.0")]
    extern "C" {
        #[link_name = "subscribe-duration"]
        fn subscribe_duration(nanos: u64) -> i32;
    }
    // SAFETY: a WASI import taking and returning plain integers; the handle
    // it returns is deliberately never dropped.
    unsafe { subscribe_duration(nanos) }
}

// The workspace's native clippy and test builds link no WASI.
#[cfg(not(target_arch = "wasm32"))]
fn subscribe_duration(_nanos: u64) -> i32 {
    0
}

// WASI's `get-random-bytes`, imported by hand like the timer: how many
// bytes a guest may ask the host to make at once is the sandbox's to bound.
#[cfg(target_arch = "wasm32")]
fn random_bytes(len: u64) -> usize {
    #[link(wasm_import_module = "wasi:random/random@0.2.0")]
    extern "C" {
        #[link_name = "get-random-bytes"]
        fn get_random_bytes(len: i64, ret: *mut usize);
    }
    let mut ret = [0usize; 2];
    // SAFETY: the canonical ABI writes the list's pointer and length to
    // `ret`, allocating the list through this module's `cabi_realloc`; the
    // list is deliberately leaked.
    unsafe { get_random_bytes(len as i64, ret.as_mut_ptr()) };
    ret[1]
}

#[cfg(not(target_arch = "wasm32"))]
fn random_bytes(len: u64) -> usize {
    len as usize
}

/// Recurses until the stack runs out; the result is never reached.
#[allow(unconditional_recursion)] // the point: exhaust the stack
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 64]);
    recurse(black_box(depth + 1)) + frame[(depth % 64) as usize]
}

export!(Hostile);
