//! The one API error type: every failure leaves as `application/problem+json`
//! (RFC 9457) with a stable `code`; unexpected failures are logged with their
//! cause chain and leave as an opaque 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::registry::RegistryError;
use crate::runtime::{CallError, LoadError};
use crate::store::StoreError;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// Dotted path of the field (`email`, `address.city`, `metadata.plan`),
    /// or a header / query parameter name.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`https://ferry.dev/problems/<code>`).
    #[serde(rename = "type")]
    pub type_: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// Explanation of this occurrence.
    pub detail: String,
    /// Stable machine-readable code.
    pub code: String,
    /// The invalid fields, for `validation_failed`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// The most field errors a problem document lists.
const MAX_LISTED_ERRORS: usize = 20;
/// The longest field name a problem document lists, in characters.
const MAX_LISTED_FIELD: usize = 128;

/// Every way an API call can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is well-formed JSON but its content is invalid.
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    /// The body is not JSON.
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    /// No live customer with this id.
    #[error("no customer with this id")]
    CustomerNotFound,
    /// Another live customer has this email.
    #[error("another customer already has this email")]
    EmailTaken,
    /// `If-Match` names a version that is not the current one.
    #[error("If-Match does not match the current version {current}")]
    PreconditionFailed {
        /// The current version.
        current: i64,
    },
    /// The body exceeds the configured limit.
    #[error("the body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request (its body included) took longer than the server allows.
    #[error("the request took longer than {seconds} s; send it again")]
    RequestTimeout {
        /// The limit in seconds.
        seconds: u64,
    },
    /// The body is not `application/json`.
    #[error("the body must be sent as {expected}")]
    UnsupportedMediaType {
        /// The accepted media types.
        expected: &'static str,
    },
    /// The idempotency key was used for a different request.
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    /// A request with this idempotency key is still running.
    #[error("a request with this Idempotency-Key is still in progress; retry later")]
    IdempotencyKeyInFlight,
    /// No loaded connector has this name.
    #[error("no connector with this name is loaded")]
    ConnectorNotFound,
    /// The connector has no such version.
    #[error("the connector has no version {0}")]
    ConnectorVersionNotFound(String),
    /// The connector has no loaded version to work with.
    #[error("no version of the connector is loaded: {0}")]
    ConnectorNotLoaded(String),
    /// Customers are linked to the connector's records, or changes wait
    /// for it.
    #[error("{linked} customers are linked to this connector's records or have changes waiting for it (pushes to make, inbound events to apply); add ?force=true to delete it anyway (the links are kept for audit, the waiting changes skipped)")]
    ConnectorInUse {
        /// How many links and inbound events.
        linked: i64,
    },
    /// The version drops the `customer` entity while customers are linked
    /// through the connector.
    #[error("{0}")]
    CustomersLinked(String),
    /// A version would be made active over a running one while it needs
    /// settings the connector lacks.
    #[error("{0}")]
    SettingsMissing(String),
    /// An uploaded component was refused; `code` says why.
    #[error("{detail}")]
    ComponentRefused {
        /// `not_wasm`, `core_module`, `invalid_component`, `not_a_connector`,
        /// `world_unsupported`, `world_too_new`, `world_mismatch`,
        /// `manifest_failed`, `invalid_manifest`, `forbidden_host` or
        /// `name_mismatch`.
        code: &'static str,
        /// What is wrong, for a person.
        detail: String,
    },
    /// An uploaded component exceeds the configured limit.
    #[error("the component exceeds {limit} bytes (FERRY_CONNECTOR_MAX_BYTES)")]
    ComponentTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The uploaded version is stored already with other bytes.
    #[error("{0}")]
    VersionExists(String),
    /// No dead letter has this id.
    #[error("no dead letter with this id")]
    DeadLetterNotFound,
    /// No conflict has this id.
    #[error("no conflict with this id")]
    ConflictNotFound,
    /// The conflict was already resolved.
    #[error("the conflict is not open")]
    ConflictNotOpen,
    /// The conflict's customer kept changing while it was resolved.
    #[error(
        "the customer kept changing while the conflict was resolved; send the resolution again"
    )]
    ConflictCustomerBusy,
    /// ferry changed these conflicting fields since the conflict was
    /// recorded, and the resolution would overwrite them.
    #[error(
        "ferry changed {0} since the conflict was recorded; read the customer and resolve again"
    )]
    ConflictStale(String),
    /// A reconciliation of the connector is going (its id).
    #[error("reconciliation {0} of this connector is still running")]
    ReconciliationRunning(String),
    /// No reconciliation run has this id.
    #[error("no reconciliation with this id")]
    ReconciliationNotFound,
    /// The run ended, or is past its listing (why).
    #[error("{0}")]
    ReconciliationNotCancellable(String),
    /// The run has no finding with this id.
    #[error("the reconciliation has no finding with this id")]
    MismatchNotFound,
    /// The finding was repaired or resolved already.
    #[error("the finding is not open")]
    MismatchNotOpen,
    /// The connector is disabled or unconfigured.
    #[error("the connector is not ready: {0}")]
    ConnectorNotReady(String),
    /// A webhook's signature did not verify.
    #[error("the webhook signature did not verify: {0}")]
    InvalidSignature(String),
    /// A verified webhook could not be parsed.
    #[error("the webhook could not be processed: {0}")]
    InvalidWebhook(String),
    /// The connector trapped, timed out or failed; the sender should retry.
    #[error("the connector could not process this delivery; retry later")]
    ConnectorFailed,
    /// A remote edit waits behind the conflict, and the remote could not be
    /// read for it: nothing was written; resolve again shortly.
    #[error("a remote edit made while the conflict was open could not be read from the remote ({0}); nothing was written, resolve again shortly")]
    RemoteUnavailable(String),
    /// ferry holds as many webhook bodies not yet verified as
    /// `webhook_buffer_bytes` allows: nothing was read or written; the
    /// sender retries.
    #[error("ferry is holding as many webhook bodies as it may; send it again shortly")]
    WebhooksBusy,
    /// Every connector instance is busy: an upload or activation could not
    /// read the manifest in time, or a webhook could not be verified.
    /// Nothing was written; send it again.
    #[error("every connector instance is busy; nothing was written, send the request again")]
    RuntimeBusy,
    /// The store did not answer in time (no connection free, a lock held
    /// by another session, a statement past its timeout); nothing was
    /// written, and the same request may be sent again.
    #[error("the store is busy; nothing was written, send the request again")]
    StoreBusy,
    /// The store takes no writes now (a standby after a failover, a
    /// read-only database, a full disk); nothing was written.
    #[error("the store takes no writes now (read-only or full); nothing was written, send the request again later")]
    StoreReadOnly,
    /// The connection to the database was lost during the request, or
    /// none could be made (the server restarting, a failover): a write
    /// under way may have landed or not.
    #[error("the connection to the database was lost; a write under way may or may not have landed: send the request again (with the same Idempotency-Key)")]
    StoreUnavailable,
    /// Secrets cannot be stored without a master key.
    #[error("secrets can only be stored when FERRY_MASTER_KEY is set; or give them through FERRY_CONNECTORS__<NAME>__SECRETS__<SECRET>")]
    MasterKeyRequired,
    /// Missing or wrong bearer token.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// Open mode (no admin token): a request named a host other than
    /// loopback (DNS rebinding), or a browser sent a write from another
    /// origin (cross-site request forgery).
    #[error("{0}")]
    CrossSiteRequest(String),
    /// No such route.
    #[error("no such resource")]
    NotFound,
    /// The route exists but not with this method.
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    /// Anything else; logged, never shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// One invalid field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::CustomerNotFound
            | Self::NotFound
            | Self::ConnectorNotFound
            | Self::ConnectorVersionNotFound(_)
            | Self::DeadLetterNotFound
            | Self::ConflictNotFound
            | Self::ReconciliationNotFound
            | Self::MismatchNotFound => StatusCode::NOT_FOUND,
            Self::ConflictNotOpen
            | Self::ConflictCustomerBusy
            | Self::ConflictStale(_)
            | Self::MismatchNotOpen
            | Self::ReconciliationRunning(_)
            | Self::ReconciliationNotCancellable(_)
            | Self::ConnectorNotReady(_) => StatusCode::CONFLICT,
            Self::MasterKeyRequired => StatusCode::CONFLICT,
            Self::ConnectorNotLoaded(_)
            | Self::ConnectorInUse { .. }
            | Self::CustomersLinked(_)
            | Self::SettingsMissing(_)
            | Self::VersionExists(_) => StatusCode::CONFLICT,
            Self::ComponentRefused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ComponentTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidSignature(_) | Self::InvalidWebhook(_) => StatusCode::BAD_REQUEST,
            Self::ConnectorFailed
            | Self::StoreBusy
            | Self::StoreReadOnly
            | Self::StoreUnavailable
            | Self::RuntimeBusy
            | Self::WebhooksBusy
            | Self::RemoteUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::EmailTaken => StatusCode::CONFLICT,
            Self::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyKeyInFlight => StatusCode::CONFLICT,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::CrossSiteRequest(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable code, part of the API contract.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Validation(_) => "validation_failed",
            Self::MalformedJson(_) => "malformed_json",
            Self::CustomerNotFound => "customer_not_found",
            Self::EmailTaken => "email_taken",
            Self::PreconditionFailed { .. } => "precondition_failed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RequestTimeout { .. } => "request_timeout",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyKeyInFlight => "idempotency_key_in_flight",
            Self::ConnectorNotFound => "connector_not_found",
            Self::ConnectorVersionNotFound(_) => "connector_version_not_found",
            Self::ConnectorNotLoaded(_) => "connector_not_loaded",
            Self::ConnectorInUse { .. } => "connector_in_use",
            Self::CustomersLinked(_) => "customers_linked",
            Self::SettingsMissing(_) => "settings_missing",
            Self::ComponentRefused { code, .. } => code,
            Self::ComponentTooLarge { .. } => "component_too_large",
            Self::VersionExists(_) => "version_exists",
            Self::DeadLetterNotFound => "dead_letter_not_found",
            Self::ConflictNotFound => "conflict_not_found",
            Self::ConflictNotOpen => "conflict_not_open",
            Self::ConflictCustomerBusy => "conflict_customer_busy",
            Self::ConflictStale(_) => "conflict_stale",
            Self::ReconciliationRunning(_) => "reconciliation_running",
            Self::ReconciliationNotCancellable(_) => "reconciliation_not_cancellable",
            Self::ReconciliationNotFound => "reconciliation_not_found",
            Self::MismatchNotFound => "mismatch_not_found",
            Self::MismatchNotOpen => "mismatch_not_open",
            Self::ConnectorNotReady(_) => "connector_not_ready",
            Self::MasterKeyRequired => "master_key_not_configured",
            Self::InvalidSignature(_) => "invalid_signature",
            Self::InvalidWebhook(_) => "invalid_webhook",
            Self::ConnectorFailed => "connector_failed",
            Self::RemoteUnavailable(_) => "remote_unavailable",
            Self::RuntimeBusy => "runtime_busy",
            Self::WebhooksBusy => "webhooks_busy",
            Self::StoreBusy => "store_busy",
            Self::StoreReadOnly => "store_read_only",
            Self::StoreUnavailable => "store_unavailable",
            Self::Unauthorized => "unauthorized",
            Self::CrossSiteRequest(_) => "cross_site_request",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Validation(_) => "Validation failed",
            Self::MalformedJson(_) => "Malformed JSON",
            Self::CustomerNotFound => "Customer not found",
            Self::EmailTaken => "Email taken",
            Self::PreconditionFailed { .. } => "Precondition failed",
            Self::PayloadTooLarge { .. } => "Payload too large",
            Self::RequestTimeout { .. } => "Request timeout",
            Self::UnsupportedMediaType { .. } => "Unsupported media type",
            Self::IdempotencyKeyReused => "Idempotency key reused",
            Self::IdempotencyKeyInFlight => "Idempotency key in flight",
            Self::ConnectorNotFound => "Connector not found",
            Self::ConnectorVersionNotFound(_) => "Connector version not found",
            Self::ConnectorNotLoaded(_) => "Connector not loaded",
            Self::ConnectorInUse { .. } => "Connector in use",
            Self::CustomersLinked(_) => "Customers linked",
            Self::SettingsMissing(_) => "Settings missing",
            Self::ComponentRefused { .. } => "Component refused",
            Self::ComponentTooLarge { .. } => "Component too large",
            Self::VersionExists(_) => "Version exists",
            Self::DeadLetterNotFound => "Dead letter not found",
            Self::ConflictNotFound => "Conflict not found",
            Self::ConflictNotOpen => "Conflict not open",
            Self::ConflictCustomerBusy => "Customer busy",
            Self::ConflictStale(_) => "Conflict stale",
            Self::ReconciliationRunning(_) => "Reconciliation running",
            Self::ReconciliationNotCancellable(_) => "Reconciliation not cancellable",
            Self::ReconciliationNotFound => "Reconciliation not found",
            Self::MismatchNotFound => "Finding not found",
            Self::MismatchNotOpen => "Finding not open",
            Self::ConnectorNotReady(_) => "Connector not ready",
            Self::MasterKeyRequired => "Master key not configured",
            Self::InvalidSignature(_) => "Invalid signature",
            Self::InvalidWebhook(_) => "Invalid webhook",
            Self::ConnectorFailed => "Connector failed",
            Self::RemoteUnavailable(_) => "Remote unavailable",
            Self::RuntimeBusy => "Runtime busy",
            Self::WebhooksBusy => "Webhooks busy",
            Self::StoreBusy => "Store busy",
            Self::StoreReadOnly => "Store takes no writes",
            Self::StoreUnavailable => "Store unreachable",
            Self::Unauthorized => "Unauthorized",
            Self::CrossSiteRequest(_) => "Cross-site request refused",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::Internal(_) => "Internal error",
        }
    }

    /// The problem document for this error. A validation's errors are
    /// listed up to [`MAX_LISTED_ERRORS`], each field name cut to
    /// [`MAX_LISTED_FIELD`] characters, and counted beyond (field `*`):
    /// a body of short unknown names (a settings write, a conflict's
    /// resolution: a megabyte holds 130,000) answered one error each,
    /// named twice, an answer ten times the request.
    pub fn problem(&self) -> Problem {
        let errors = match self {
            Self::Validation(errors) => {
                let mut listed: Vec<FieldError> = errors
                    .iter()
                    .take(MAX_LISTED_ERRORS)
                    .map(|e| FieldError {
                        field: e.field.chars().take(MAX_LISTED_FIELD).collect(),
                        message: e.message.clone(),
                    })
                    .collect();
                if errors.len() > MAX_LISTED_ERRORS {
                    listed.push(FieldError::new(
                        "*",
                        format!("{} more invalid fields", errors.len() - MAX_LISTED_ERRORS),
                    ));
                }
                listed
            }
            _ => Vec::new(),
        };
        let detail = match self {
            Self::Validation(_) => {
                let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
                format!("invalid fields: {}", fields.join(", "))
            }
            other => other.to_string(),
        };
        Problem {
            type_: format!("https://ferry.dev/problems/{}", self.code()),
            title: self.title().to_owned(),
            status: self.status().as_u16(),
            detail,
            code: self.code().to_owned(),
            errors,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::CustomerNotFound => Self::CustomerNotFound,
            StoreError::EmailTaken => Self::EmailTaken,
            StoreError::VersionMismatch { current } => Self::PreconditionFailed { current },
            // Another request holds the key now (a retry took it over).
            StoreError::IdempotencyClaimLost => Self::IdempotencyKeyInFlight,
            busy if busy.is_busy() => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(busy)),
                    "the store was busy"
                );
                Self::StoreBusy
            }
            read_only if read_only.takes_no_writes() => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(read_only)),
                    "the store takes no writes"
                );
                Self::StoreReadOnly
            }
            // A failover's or a restart's moment, not a fault of ferry's:
            // answered 500 `internal`, the client had no word that sending
            // it again was the thing to do.
            lost if lost.lost_connection() => {
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(lost)),
                    "the connection to the store was lost"
                );
                Self::StoreUnavailable
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::NotFound => Self::ConnectorNotFound,
            RegistryError::VersionNotFound(v) => Self::ConnectorVersionNotFound(v),
            RegistryError::NotLoaded(why) => Self::ConnectorNotLoaded(why),
            RegistryError::Linked(linked) => Self::ConnectorInUse { linked },
            RegistryError::DropsCustomers { .. } => Self::CustomersLinked(error.to_string()),
            RegistryError::NeedsSettings { .. } => Self::SettingsMissing(error.to_string()),
            RegistryError::Settings(problems) => Self::Validation(
                problems
                    .into_iter()
                    .map(|p| FieldError::new(p.field, p.message))
                    .collect(),
            ),
            RegistryError::MasterKeyRequired => Self::MasterKeyRequired,
            RegistryError::TooLarge { limit } => Self::ComponentTooLarge { limit },
            RegistryError::VersionExists(_) => Self::VersionExists(error.to_string()),
            RegistryError::NameMismatch { .. } => Self::ComponentRefused {
                code: "name_mismatch",
                detail: error.to_string(),
            },
            // Ferry's own pacing (every instance busy), not the component:
            // a refusal would tell its author to change what is fine.
            RegistryError::Invalid(LoadError::ManifestCall(CallError::Throttled { .. })) => {
                Self::RuntimeBusy
            }
            RegistryError::Invalid(load) => Self::ComponentRefused {
                code: load.code(),
                detail: load.to_string(),
            },
            // As for a busy store: nothing written, send it again.
            RegistryError::Changed => Self::StoreBusy,
            RegistryError::Stale(current) => Self::PreconditionFailed { current },
            RegistryError::Store(store) => store.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        // A 503 that is no "busy, send it again" (the trace layer logs a
        // 503 at `warn`): a store that takes no writes, a connector that
        // failed, a remote that is down. Said at `error`, as every 503 was.
        if matches!(
            self,
            Self::StoreReadOnly | Self::ConnectorFailed | Self::RemoteUnavailable(_)
        ) {
            tracing::error!(code = self.code(), detail = %self, "request failed");
        }
        let status = self.status();
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Self::PreconditionFailed { current } = self {
            if let Ok(etag) = HeaderValue::from_str(&format!("\"{current}\"")) {
                headers.insert(header::ETAG, etag);
            }
        }
        if matches!(
            self,
            Self::StoreBusy | Self::IdempotencyKeyInFlight | Self::RuntimeBusy | Self::WebhooksBusy
        ) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, Self::StoreReadOnly | Self::StoreUnavailable) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if matches!(self, Self::Unauthorized) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection lost mid-request (a failover, a restart) is a 503 to
    /// send again, not a 500 that says nothing.
    #[test]
    fn a_lost_connection_is_a_passing_failure() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let lost = ApiError::from(StoreError::Database(sqlx::Error::Io(reset)));
        assert_eq!(
            (lost.status(), lost.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        );
        assert_eq!(lost.into_response().headers()[header::RETRY_AFTER], "5");
        let other = ApiError::from(StoreError::Database(sqlx::Error::RowNotFound));
        assert_eq!(other.code(), "internal");
    }

    /// A manifest read held back by ferry's own pacing is a 503 to send
    /// again, not the component's refusal.
    #[test]
    fn a_busy_runtime_is_no_refusal() {
        let busy = ApiError::from(RegistryError::Invalid(LoadError::ManifestCall(
            CallError::Throttled {
                wait: std::time::Duration::from_millis(200),
                reached_remote: false,
            },
        )));
        assert_eq!(
            (busy.status(), busy.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "runtime_busy")
        );
        let trapped = ApiError::from(RegistryError::Invalid(LoadError::ManifestCall(
            CallError::DeadlineExceeded,
        )));
        assert_eq!(
            (trapped.status(), trapped.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "manifest_failed")
        );
    }
}
