//! OAuth 2.0 tokens that the host obtains, caches and refreshes.
//!
//! The connector describes the grant; the host sends the token request (with
//! the client secret it alone holds), caches the token per connector and
//! substitutes it wherever the connector writes [`placeholder`]. A call
//! therefore does not fetch a token every time, and the token never enters
//! the component.
//!
//! ```no_run
//! use ferry_sdk::http::{Request, Response};
//! use ferry_sdk::oauth::{self, ClientCredentials};
//! use ferry_sdk::ConnectorError;
//!
//! fn create(body: &serde_json::Value) -> Result<Response, ConnectorError> {
//!     let grant = ClientCredentials::new(
//!         "https://login.example.com/oauth2/token",
//!         "client_id",
//!         "client_secret",
//!     );
//!     // Retried once with a new token if the remote refuses this one.
//!     oauth::with_token("api", &grant, |token| {
//!         let base = token.field("instance_url").unwrap_or("https://api.example.com");
//!         Request::post(format!("{base}/contacts"))
//!             .bearer_token(token)
//!             .json(body)?
//!             .send()?
//!             .error_for_status()
//!     })
//! }
//! ```

use serde_json::{Map, Value};

use crate::bindings::ferry::connector::oauth as raw;
use crate::ConnectorError;

/// The placeholder the host replaces with the value of token `name`.
///
/// ```
/// assert_eq!(ferry_sdk::oauth::placeholder("api"), "{{token:api}}");
/// ```
pub fn placeholder(name: &str) -> String {
    format!("{{{{token:{name}}}}}")
}

/// The client-credentials grant (RFC 6749, section 4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    /// The token endpoint, an absolute URL on a declared host.
    pub token_url: String,
    /// Name of the secret holding the client id.
    pub client_id_secret: String,
    /// Name of the secret holding the client secret.
    pub client_secret_secret: String,
    /// Space-separated scopes, if the server wants them.
    pub scope: Option<String>,
}

impl ClientCredentials {
    /// A grant against `token_url` with the client id and secret held in
    /// the secrets named `client_id_secret` and `client_secret_secret`.
    pub fn new(
        token_url: impl Into<String>,
        client_id_secret: impl Into<String>,
        client_secret_secret: impl Into<String>,
    ) -> Self {
        Self {
            token_url: token_url.into(),
            client_id_secret: client_id_secret.into(),
            client_secret_secret: client_secret_secret.into(),
            scope: None,
        }
    }

    /// Asks for `scope` (space-separated).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    fn to_raw(&self) -> raw::ClientCredentials {
        raw::ClientCredentials {
            token_url: self.token_url.clone(),
            client_id_secret: self.client_id_secret.clone(),
            client_secret_secret: self.client_secret_secret.clone(),
            scope: self.scope.clone(),
        }
    }
}

/// A token the host holds: everything about it but its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    name: String,
    generation: u64,
    fields: Map<String, Value>,
    expires_at_ms: Option<i64>,
}

impl Token {
    /// The name the token is cached under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Changes each time the host obtains a new token.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A text field of the token response, e.g. Salesforce's `instance_url`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }

    /// Every field of the token response but the tokens themselves.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// When the token expires, ms since the Unix epoch: the server's
    /// `expires_in`, a day at most (a day when it sent none). `None` from an older
    /// ferry, which kept such a token until it was invalidated.
    pub fn expires_at_ms(&self) -> Option<i64> {
        self.expires_at_ms
    }

    /// `Bearer {{token:NAME}}`, for an `Authorization` header.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", placeholder(&self.name))
    }

    /// Tells the host the remote refused this token, so the next
    /// [`client_credentials`] call obtains a new one.
    pub fn invalidate(&self) {
        raw::invalidate(&self.name, self.generation);
    }
}

/// The token called `name`: the host's cached one, or a new one obtained
/// with `grant` (a refusal from the token endpoint is the answer, without
/// asking again, for the same grant for 5 s, or its `Retry-After` up to a
/// minute).
pub fn client_credentials(name: &str, grant: &ClientCredentials) -> Result<Token, ConnectorError> {
    let info = raw::client_credentials_token(name, &grant.to_raw())?;
    let fields = match serde_json::from_str::<Value>(&info.fields) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    Ok(Token {
        name: name.to_owned(),
        generation: info.generation,
        fields,
        expires_at_ms: info.expires_at_ms,
    })
}

/// Runs `call` with token `name`; if it fails with
/// [`ConnectorError::Unauthorized`] (map the remote's "session expired" to
/// it), invalidates the token and runs `call` once more with a new one.
pub fn with_token<T>(
    name: &str,
    grant: &ClientCredentials,
    mut call: impl FnMut(&Token) -> Result<T, ConnectorError>,
) -> Result<T, ConnectorError> {
    let token = client_credentials(name, grant)?;
    match call(&token) {
        Err(ConnectorError::Unauthorized(_)) => {
            token.invalidate();
            let fresh = client_credentials(name, grant)?;
            call(&fresh)
        }
        other => other,
    }
}
