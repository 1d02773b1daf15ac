//! `ferry-sdk`: everything a connector author needs to write a ferry connector.
//!
//! A connector is a WebAssembly component (`wasm32-wasip2`) that ferry loads at
//! run time. Implement [`Connector`] for a type, export it with
//! [`export_connector!`], and build with
//! `cargo build --target wasm32-wasip2 --release`:
//!
//! ```
//! use ferry_sdk::{Connector, ConnectorError, Manifest, PushRequest, PushResult};
//!
//! struct Acme;
//!
//! impl Connector for Acme {
//!     fn manifest() -> Manifest {
//!         Manifest::builder("acme", env!("CARGO_PKG_VERSION"))
//!             .description("Acme CRM customers")
//!             .entity("customer")
//!             .host("api.acme.example")
//!             .secret("api_key", "Acme API key", true)
//!             .build()
//!     }
//!
//!     fn push(req: PushRequest) -> Result<PushResult, ConnectorError> {
//!         let customer: ferry_sdk::Customer = ferry_sdk::json::from_str(&req.record)?;
//!         let resp = ferry_sdk::http::Request::post("https://api.acme.example/customers")
//!             .bearer_secret("api_key")
//!             .json(&customer)?
//!             .send()?
//!             .error_for_status()?;
//!         let created: serde_json::Value = resp.json()?;
//!         // Without its id the record cannot be linked: say so (an empty
//!         // id dead-letters the change after the record was made).
//!         let id = created["id"].as_str().ok_or_else(|| {
//!             ConnectorError::permanent("the created customer has no id")
//!         })?;
//!         Ok(PushResult::new(id))
//!     }
//! }
//!
//! ferry_sdk::export_connector!(Acme);
//! ```
//!
//! Secrets never enter the component: name them in `{{secret:NAME}}`
//! placeholders (see [`http::secret`]) or key an HMAC with them
//! ([`crypto::hmac_sha256`]); the host does the rest. OAuth 2.0 tokens work
//! the same way: the host obtains and caches them ([`oauth`]).
#![deny(missing_docs)]

mod customer;
mod errors;
mod records;

pub mod clock;
pub mod crypto;
pub mod http;
pub mod log;
pub mod oauth;
pub mod settings;
pub mod webhook;

/// Raw bindings generated from `wit/since_v0.2.0/connector.wit`.
///
/// Prefer the re-exports and helpers at the crate root; this module is public
/// so the generated export glue can reach it from the connector's crate.
#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "connector",
        path: "wit/since_v0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_connector",
        default_bindings_module: "ferry_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

pub use customer::{Address, ChangedFields, Customer};
pub use errors::HttpError;
pub use records::{ensure_entity, ManifestBuilder};

pub use bindings::exports::ferry::connector::handler::{
    ChangeKind, Event, Manifest, Operation, Page, ParsedWebhook, PushRequest, PushResult,
    RemoteRecord, SecretSpec, SettingSpec, WebhookReply, WebhookRequest,
};
pub use bindings::ferry::connector::types::{ConnectorError, Header, RateLimit};

/// `serde_json`, re-exported so connectors parse records with the same version.
pub use serde_json as json;

/// The SDK's WIT package version: the contract this SDK builds against.
pub const WIT_VERSION: &str = "0.2.0";

#[cfg(all(feature = "testkit", not(target_arch = "wasm32")))]
pub mod testkit;

// The guides' examples are compiled as doctests of this crate, so they
// cannot drift from it (they use the test kit, hence the feature).
#[cfg(all(doctest, feature = "testkit", not(target_arch = "wasm32")))]
#[doc = include_str!("../../docs/sdk.md")]
struct SdkGuide;

/// What a connector does. Every method but [`Connector::manifest`] has a
/// default that answers [`ConnectorError::Unsupported`], so a connector
/// implements only what its remote supports.
///
/// Methods are associated functions: the host calls each one on a fresh
/// instance, so there is no state to carry between calls.
pub trait Connector {
    /// Who the connector is and what it needs. Must not call host imports.
    fn manifest() -> Manifest;

    /// Checks a webhook's signature (and timestamp) before anything is parsed.
    fn verify_webhook(req: WebhookRequest) -> Result<(), ConnectorError> {
        let _ = req;
        Err(ConnectorError::unsupported("webhooks are not supported"))
    }

    /// Turns a verified webhook into events.
    fn parse_webhook(req: WebhookRequest) -> Result<ParsedWebhook, ConnectorError> {
        let _ = req;
        Err(ConnectorError::unsupported("webhooks are not supported"))
    }

    /// Creates, updates or deletes one remote record.
    fn push(req: PushRequest) -> Result<PushResult, ConnectorError> {
        Err(ConnectorError::unsupported(format!(
            "push of {} is not supported",
            req.entity
        )))
    }

    /// Reads one remote record.
    fn fetch(entity: String, remote_id: String) -> Result<RemoteRecord, ConnectorError> {
        let _ = remote_id;
        Err(ConnectorError::unsupported(format!(
            "fetch of {entity} is not supported"
        )))
    }

    /// Reads a page of at most `limit` remote records after `cursor`.
    fn list(entity: String, cursor: Option<String>, limit: u32) -> Result<Page, ConnectorError> {
        let _ = (cursor, limit);
        Err(ConnectorError::unsupported(format!(
            "list of {entity} is not supported"
        )))
    }
}

/// Bridges a [`Connector`] to the generated WIT export trait. Used by
/// [`export_connector!`]; not meant to be named directly.
#[doc(hidden)]
pub struct Adapter<T>(core::marker::PhantomData<T>);

impl<T: Connector> bindings::exports::ferry::connector::handler::Guest for Adapter<T> {
    fn get_manifest() -> Manifest {
        T::manifest()
    }
    fn verify_webhook(req: WebhookRequest) -> Result<(), ConnectorError> {
        T::verify_webhook(req)
    }
    fn parse_webhook(req: WebhookRequest) -> Result<ParsedWebhook, ConnectorError> {
        T::parse_webhook(req)
    }
    fn push(req: PushRequest) -> Result<PushResult, ConnectorError> {
        T::push(req)
    }
    fn fetch(entity: String, remote_id: String) -> Result<RemoteRecord, ConnectorError> {
        T::fetch(entity, remote_id)
    }
    fn list(entity: String, cursor: Option<String>, limit: u32) -> Result<Page, ConnectorError> {
        T::list(entity, cursor, limit)
    }
}

/// Exports a [`Connector`] implementation as the component's `connector`
/// interface. Call it once, at the root of the connector's crate:
///
/// ```
/// use ferry_sdk::{Connector, Manifest};
///
/// struct MyConnector;
///
/// impl Connector for MyConnector {
///     fn manifest() -> Manifest {
///         Manifest::builder("my-connector", "0.1.0").entity("customer").build()
///     }
/// }
///
/// ferry_sdk::export_connector!(MyConnector);
/// ```
#[macro_export]
macro_rules! export_connector {
    ($connector:ty) => {
        // The generated export macro takes an identifier, so name the adapter.
        type __FerryConnectorExport = $crate::Adapter<$connector>;
        $crate::bindings::__export_connector!(
            __FerryConnectorExport with_types_in $crate::bindings
        );
    };
}
