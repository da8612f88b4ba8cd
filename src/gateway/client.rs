//! A small client of the gateway's HTTP API (HTTP/1.1, one kept-alive
//! connection per client), for `hands demo`, `hands conformance` and
//! `hands bench`. Agent loops use any HTTP client; this one exists so the
//! binary can drive a gateway without one.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {cause}")]
    Connect {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    // hyper's messages leave their cause out: it is added here, and not
    // also a `source()`, so that a printer of error chains shows it once.
    #[error("HTTP: {}", crate::util::error_chain(.0))]
    Http(hyper::Error),
    #[error("building the request: {0}")]
    Request(http::Error),
    #[error("{method} {path}: the answer is not JSON: {body}")]
    NotJson {
        method: String,
        path: String,
        body: String,
    },
}

impl From<hyper::Error> for ClientError {
    fn from(e: hyper::Error) -> Self {
        ClientError::Http(e)
    }
}

impl From<http::Error> for ClientError {
    fn from(e: http::Error) -> Self {
        ClientError::Request(e)
    }
}

/// An answer: status, the `hands-outcome` header if any, and the JSON body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub outcome: Option<String>,
    pub body: Value,
}

/// One SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: Value,
}

pub struct ApiClient {
    addr: SocketAddr,
    token: String,
    conn: Option<SendRequest<Full<bytes::Bytes>>>,
}

impl ApiClient {
    pub fn new(addr: SocketAddr, token: &str) -> Self {
        ApiClient {
            addr,
            token: token.to_string(),
            conn: None,
        }
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<bytes::Bytes>>, ClientError> {
        if let Some(c) = &self.conn {
            if c.is_closed() {
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            let tcp = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|cause| ClientError::Connect {
                    addr: self.addr,
                    cause,
                })?;
            let _ = tcp.set_nodelay(true);
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            self.conn = Some(send);
        }
        let send = self.conn.as_mut().expect("just set");
        send.ready().await?;
        Ok(send)
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        accept: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let body = bytes::Bytes::from(body.map(|b| b.to_string()).unwrap_or_default());
        let reused = self.conn.as_ref().is_some_and(|c| !c.is_closed());
        match self.send_once(method, path, body.clone(), accept).await {
            // The gateway closed the kept-alive connection (its idle timeout)
            // as this request went out; hyper had not sent it, so sending it
            // again on a new connection cannot run anything twice.
            Err(ClientError::Http(e)) if reused && (e.is_canceled() || e.is_closed()) => {
                self.send_once(method, path, body, accept).await
            }
            r => r,
        }
    }

    async fn send_once(
        &mut self,
        method: &str,
        path: &str,
        body: bytes::Bytes,
        accept: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::ACCEPT, accept)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let send = self.sender().await?;
        match send.send_request(req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.conn = None;
                Err(e.into())
            }
        }
    }

    /// A JSON request and its JSON answer.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let resp = self.send(method, path, body, "application/json").await?;
        let status = resp.status().as_u16();
        let outcome = resp
            .headers()
            .get("hands-outcome")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes).map_err(|_| ClientError::NotJson {
            method: method.to_string(),
            path: path.to_string(),
            body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
        })?;
        Ok(Answer {
            status,
            outcome,
            body,
        })
    }

    /// An SSE request: every event until the stream ends (`on_event` sees
    /// each as it arrives).
    pub async fn stream(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        mut on_event: impl FnMut(&SseEvent),
    ) -> Result<(u16, Vec<SseEvent>), ClientError> {
        self.stream_until(method, path, body, |e| {
            on_event(e);
            false
        })
        .await
    }

    /// An SSE request, read until `stop` says so or the stream ends. Stopping
    /// early drops the connection, as a client that goes away does.
    pub async fn stream_until(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        mut stop: impl FnMut(&SseEvent) -> bool,
    ) -> Result<(u16, Vec<SseEvent>), ClientError> {
        let resp = self.send(method, path, body, "text/event-stream").await?;
        let status = resp.status().as_u16();
        let is_stream = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_stream {
            // An error answer: JSON, returned as one `response` event.
            let bytes = resp.into_body().collect().await?.to_bytes();
            let data = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
            return Ok((
                status,
                vec![SseEvent {
                    event: "response".into(),
                    data,
                }],
            ));
        }
        let mut body = resp.into_body();
        // Bytes, not text: a frame may end inside a UTF-8 sequence.
        let mut buf: Vec<u8> = Vec::new();
        let mut events = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(end) = memchr::memmem::find(&buf, b"\n\n") {
                let raw: Vec<u8> = buf.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&raw);
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                let ev = SseEvent {
                    event,
                    data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
                };
                let done = stop(&ev);
                events.push(ev);
                if done {
                    self.conn = None;
                    return Ok((status, events));
                }
            }
        }
        Ok((status, events))
    }
}
