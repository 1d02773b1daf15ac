//! Bindings for `ferry:connector@0.1.0`, generated from `wit/since_v0.1.0`,
//! and its imports implemented by delegating to the newest version's.
//!
//! 0.1.0 has every interface of 0.2.0 but `oauth`, with the same shapes, so
//! each import converts its arguments, calls the 0.2.0 implementation and
//! converts the answer back. The exports need no code: a call type-checks
//! the guest's functions structurally, so the 0.2.0 Rust types call a 0.1.0
//! `handler` as they are.

use super::latest::ferry::connector as latest;

wasmtime::component::bindgen!({
    world: "connector",
    path: "wit/since_v0.1.0",
    imports: {
        "ferry:connector/http.send": async,
    },
    exports: { default: async },
});

use self::ferry::connector::{clock, crypto, http, log, settings, types};
use crate::state::CallState;

impl types::Host for CallState {}

impl clock::Host for CallState {
    fn now_ms(&mut self) -> i64 {
        latest::clock::Host::now_ms(self)
    }
}

impl settings::Host for CallState {
    fn get(&mut self, name: String) -> Option<String> {
        latest::settings::Host::get(self, name)
    }
}

impl crypto::Host for CallState {
    fn hmac_sha256(&mut self, secret: String, message: Vec<u8>) -> Result<Vec<u8>, String> {
        latest::crypto::Host::hmac_sha256(self, secret, message)
    }
}

impl log::Host for CallState {
    fn write(&mut self, level: log::Level, message: String) {
        use latest::log::Level as L;
        let level = match level {
            log::Level::Trace => L::Trace,
            log::Level::Debug => L::Debug,
            log::Level::Info => L::Info,
            log::Level::Warn => L::Warn,
            log::Level::Error => L::Error,
        };
        latest::log::Host::write(self, level, message);
    }
}

impl http::Host for CallState {
    async fn send(&mut self, req: http::Request) -> Result<http::Response, http::HttpError> {
        use latest::http::{HttpError as E, Method as M};
        let method = match req.method {
            http::Method::Get => M::Get,
            http::Method::Post => M::Post,
            http::Method::Put => M::Put,
            http::Method::Patch => M::Patch,
            http::Method::Delete => M::Delete,
            http::Method::Head => M::Head,
        };
        let req = latest::http::Request {
            method,
            url: req.url,
            headers: req.headers,
            body: req.body,
            timeout_ms: req.timeout_ms,
        };
        match latest::http::Host::send(self, req).await {
            Ok(r) => Ok(http::Response {
                status: r.status,
                headers: r.headers,
                body: r.body,
            }),
            Err(e) => Err(match e {
                E::Denied(m) => http::HttpError::Denied(m),
                E::InvalidRequest(m) => http::HttpError::InvalidRequest(m),
                E::Connect(m) => http::HttpError::Connect(m),
                E::Timeout(m) => http::HttpError::Timeout(m),
                E::TooLarge(m) => http::HttpError::TooLarge(m),
            }),
        }
    }
}
