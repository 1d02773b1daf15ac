//! Bindings for `ferry:connector@0.2.0`, generated from `wit/since_v0.2.0`:
//! the newest version, the one the host's capabilities implement (see
//! [`super`] for how older versions reach them). The exported records
//! derive serde so the CLI and the API can print a manifest as JSON.

wasmtime::component::bindgen!({
    world: "connector",
    path: "wit/since_v0.2.0",
    // Only `http.send` and `oauth` wait (on I/O, or on another call's token
    // request); the other imports answer from memory. No `tracing`: at
    // TRACE it logged each call's arguments whole, a `log.write` message
    // before its 8 KiB cut and its 1000 lines a call.
    imports: {
        "ferry:connector/http.send": async,
        "ferry:connector/oauth.client-credentials-token": async,
        "ferry:connector/oauth.invalidate": async,
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
