//! Bindings for `ferry:connector@0.1.0`, generated from `wit/v0.1.0`.
//!
//! One module per supported WIT version: a released version is frozen, so
//! this module only changes when wasmtime's generator does. The exported
//! records derive serde so the CLI and the API can print a manifest as JSON.

wasmtime::component::bindgen!({
    world: "connector",
    path: "../wit/v0.1.0",
    // Only `http.send` and `oauth` wait (on I/O, or on another call's token
    // request); the other imports answer from memory.
    imports: {
        "ferry:connector/http.send": async,
        "ferry:connector/oauth.client-credentials-token": async,
        "ferry:connector/oauth.invalidate": async,
        default: tracing,
    },
    exports: { default: async },
    additional_derives: [
        serde::Serialize,
        serde::Deserialize,
        Clone,
        PartialEq,
    ],
});

pub use self::ferry::connector::types::{ConnectorError, RateLimit};
pub use exports::ferry::connector::handler::{
    ChangeKind, Event, Manifest, Operation, Page, ParsedWebhook, PushRequest, PushResult,
    RemoteRecord, SecretSpec, SettingSpec, WebhookReply, WebhookRequest,
};
