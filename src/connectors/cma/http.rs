//! The connector's HTTP client for the Claude Managed Agents API: HTTP/1.1
//! over TLS (the system's trust store, so a corporate TLS-inspecting proxy's CA
//! installed on the host works) or plain HTTP (a local fake), through an
//! HTTP CONNECT proxy when `HTTPS_PROXY`/`NO_PROXY` say so, with the official
//! client's retry rules under every call (contract §5.1, §5.2):
//!
//! - retried up to twice more: connection errors and timeouts, 408, 409, 429,
//!   5xx, or `x-should-retry: true`; never with `x-should-retry: false`;
//! - the delay is `retry-after-ms` / `retry-after` when positive, else
//!   `min(0.5·2^r, 8) s × (1 − 0.25·U[0,1))`;
//! - "fatal 4xx" (400–499 except 408, 409, 429) is what the worker loops
//!   never retry themselves.
//!
//! Every request carries exactly one credential, `Authorization: Bearer`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::secret::Secret;
use crate::net::client::Connector;

/// The API version this connector speaks (the SDK build's constant).
pub const ANTHROPIC_VERSION: &str = "2026-10-21";
pub const BETA_MANAGED_AGENTS: &str = "managed-agents-2026-04-01";
pub const BETA_MEMORY: &str = "agent-memory-2026-07-22";
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const READ_TIMEOUT: Duration = Duration::from_secs(600);
/// Client-level retries after the first attempt.
pub const MAX_RETRIES: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{method} {path}: {message}")]
    Transport {
        method: String,
        path: String,
        message: String,
    },
    #[error("{method} {path}: HTTP {status}: {body:.300}")]
    Status {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("bad base URL {0:?}")]
    BaseUrl(String),
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// 400–499 other than 408, 409, 429: never retried by the worker loops.
    pub fn is_fatal_4xx(&self) -> bool {
        self.status().is_some_and(fatal_4xx)
    }
}

pub fn fatal_4xx(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 409 | 429)
}

/// Which `anthropic-beta` header a call carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beta {
    ManagedAgents,
    Memory,
    None,
}

/// An answer: status, headers and the whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

// ---- the client ------------------------------------------------------------

/// One request.
pub struct Request<'a> {
    pub method: http::Method,
    /// Path and query, e.g. `/v1/environments/env_1/work/poll?block_ms=999`.
    pub path: String,
    pub token: &'a Secret,
    pub beta: Beta,
    /// A JSON body, already serialised (field order matters to some readers);
    /// `Bytes`, so a retry re-sends it without copying it.
    pub body: Option<Bytes>,
    /// Extra headers (e.g. `Anthropic-Worker-ID` on poll).
    pub headers: Vec<(&'static str, String)>,
    pub accept: &'static str,
}

impl<'a> Request<'a> {
    pub fn new(method: http::Method, path: impl Into<String>, token: &'a Secret) -> Self {
        Request {
            method,
            path: path.into(),
            token,
            beta: Beta::ManagedAgents,
            body: None,
            headers: Vec::new(),
            accept: "application/json",
        }
    }
}

#[derive(Clone)]
pub struct Api {
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    /// `scheme://authority` plus an optional path prefix, no trailing slash.
    base: String,
    /// Retry delays are scaled by this (tests shorten them).
    pub retry_scale: f64,
}

impl Api {
    pub fn new(base_url: &str) -> Result<Api, ApiError> {
        let base = base_url.trim_end_matches('/').to_string();
        let uri: http::Uri = base
            .parse()
            .map_err(|_| ApiError::BaseUrl(base_url.to_string()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(ApiError::BaseUrl(base_url.to_string()));
        }
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(
                    Connector::system_roots(CONNECT_TIMEOUT)
                        .map_err(|e| ApiError::BaseUrl(format!("TLS: {e}")))?,
                );
        Ok(Api {
            client,
            base,
            retry_scale: 1.0,
        })
    }

    fn build(
        &self,
        req: &Request<'_>,
        retries: u32,
    ) -> Result<http::Request<Full<Bytes>>, ApiError> {
        let mut b = http::Request::builder()
            .method(req.method.clone())
            .uri(format!("{}{}", self.base, req.path))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", req.token.expose()),
            )
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header(http::header::ACCEPT, req.accept)
            .header("x-stainless-retry-count", retries.to_string())
            .header(
                http::header::USER_AGENT,
                concat!("hands/", env!("CARGO_PKG_VERSION")),
            );
        match req.beta {
            Beta::ManagedAgents => b = b.header("anthropic-beta", BETA_MANAGED_AGENTS),
            Beta::Memory => b = b.header("anthropic-beta", BETA_MEMORY),
            Beta::None => {}
        }
        for (k, v) in &req.headers {
            b = b.header(*k, v);
        }
        let body = req.body.clone().unwrap_or_default();
        if req.method == http::Method::POST {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(body))
            .map_err(|e| ApiError::BaseUrl(e.to_string()))
    }

    fn transport(req: &Request<'_>, message: impl std::fmt::Display) -> ApiError {
        ApiError::Transport {
            method: req.method.to_string(),
            path: strip_query(&req.path),
            message: message.to_string(),
        }
    }

    /// Sends with client-level retries; an answer that is not 2xx is an error.
    pub async fn send(&self, req: &Request<'_>) -> Result<Answer, ApiError> {
        let mut retries = 0;
        loop {
            let attempt = async {
                let resp = self
                    .client
                    .request(self.build(req, retries)?)
                    .await
                    .map_err(|e| Self::transport(req, crate::util::error_chain(&e)))?;
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| Self::transport(req, e))?
                    .to_bytes();
                Ok::<_, ApiError>(Answer {
                    status,
                    headers,
                    body,
                })
            };
            let result = match tokio::time::timeout(READ_TIMEOUT, attempt).await {
                Ok(r) => r,
                Err(_) => Err(Self::transport(req, "timed out")),
            };
            let (retry, delay_hint) = match &result {
                Ok(a) if (200..300).contains(&a.status) => return result,
                Ok(a) => (should_retry(a.status, &a.headers), retry_after(&a.headers)),
                Err(_) => (true, None),
            };
            if !retry || retries >= MAX_RETRIES {
                return match result {
                    Ok(a) => Err(ApiError::Status {
                        method: req.method.to_string(),
                        path: strip_query(&req.path),
                        status: a.status,
                        body: String::from_utf8_lossy(&a.body).into_owned(),
                    }),
                    Err(e) => Err(e),
                };
            }
            let delay = delay_hint.unwrap_or_else(|| backoff(retries));
            tokio::time::sleep(delay.mul_f64(self.retry_scale)).await;
            retries += 1;
        }
    }

    /// Opens a streaming response (the SSE feed): retries apply to
    /// establishing it only.
    pub async fn open_stream(
        &self,
        req: &Request<'_>,
    ) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
        let mut retries = 0;
        loop {
            let result = match tokio::time::timeout(
                READ_TIMEOUT,
                self.client.request(self.build(req, retries)?),
            )
            .await
            {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(Self::transport(req, crate::util::error_chain(&e))),
                Err(_) => Err(Self::transport(req, "timed out")),
            };
            let (retry, hint) = match &result {
                Ok(r) if r.status().is_success() => return result,
                Ok(r) => (
                    should_retry(r.status().as_u16(), r.headers()),
                    retry_after(r.headers()),
                ),
                Err(_) => (true, None),
            };
            if !retry || retries >= MAX_RETRIES {
                return match result {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r
                            .into_body()
                            .collect()
                            .await
                            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                            .unwrap_or_default();
                        Err(ApiError::Status {
                            method: req.method.to_string(),
                            path: strip_query(&req.path),
                            status,
                            body,
                        })
                    }
                    Err(e) => Err(e),
                };
            }
            tokio::time::sleep(
                hint.unwrap_or_else(|| backoff(retries))
                    .mul_f64(self.retry_scale),
            )
            .await;
            retries += 1;
        }
    }
}

fn strip_query(path: &str) -> String {
    path.split('?').next().unwrap_or(path).to_string()
}

/// Whether the client retries this status (§5.2).
pub fn should_retry(status: u16, headers: &http::HeaderMap) -> bool {
    match headers.get("x-should-retry").and_then(|v| v.to_str().ok()) {
        Some("true") => return true,
        Some("false") => return false,
        _ => {}
    }
    matches!(status, 408 | 409 | 429) || status >= 500
}

/// `retry-after-ms`, else `retry-after` (seconds or an HTTP date), when > 0.
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        if ms > 0.0 && ms.is_finite() {
            return Some(Duration::from_secs_f64((ms / 1000.0).min(600.0)));
        }
    }
    let v = get("retry-after")?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs > 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs.min(600.0)));
    }
    let when =
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    (delta.is_positive()).then(|| Duration::from_secs_f64(delta.as_seconds_f64().min(600.0)))
}

/// `min(0.5·2^r, 8) × (1 − 0.25·U[0,1))` seconds.
pub fn backoff(retries: u32) -> Duration {
    let base = (0.5 * 2f64.powi(retries as i32)).min(8.0);
    Duration::from_secs_f64(base * (1.0 - 0.25 * unit()))
}

/// U[0,1).
pub fn unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classes_follow_the_contract() {
        let none = http::HeaderMap::new();
        for s in [408, 409, 429, 500, 502, 503, 529] {
            assert!(should_retry(s, &none), "{s}");
        }
        for s in [400, 401, 403, 404, 412, 413, 422] {
            assert!(!should_retry(s, &none), "{s}");
            assert!(fatal_4xx(s), "{s}");
        }
        for s in [408, 409, 429, 500] {
            assert!(!fatal_4xx(s), "{s}");
        }
        let mut h = http::HeaderMap::new();
        h.insert("x-should-retry", "false".parse().unwrap());
        assert!(!should_retry(503, &h));
        h.insert("x-should-retry", "true".parse().unwrap());
        assert!(should_retry(400, &h));
    }

    #[test]
    fn retry_delays() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", "0".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        for r in 0..6 {
            let d = backoff(r).as_secs_f64();
            let base = (0.5 * 2f64.powi(r as i32)).min(8.0);
            assert!(d <= base && d > base * 0.75 - 1e-9, "{r}: {d}");
        }
    }
}
