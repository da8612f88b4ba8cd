//! The gateway's two listeners and the connections they accept.
//!
//! - **Budgets.** Each listener has its own connection budget
//!   ([`Budgets`]), both within the process's descriptor limit, so that
//!   connections to the API, which anyone who reaches its port can open
//!   without a token, never take the descriptors worker tunnels need.
//! - **Accept errors** ([`Acceptor`], shared with the worker's metrics
//!   listener in [`crate::net::httpd`]) are counted and logged and followed by
//!   a growing pause.
//! - **API connections** ([`serve_api`]) are served by
//!   [`crate::net::httpd::serve`]: HTTP/1.1 with three timers (a request's
//!   head, an idle kept-alive connection, a client leaving a response
//!   unread). A request being handled has no time limit of its own — a tool
//!   call may run for minutes — and a body being received is bounded by
//!   `idle_timeout` between its chunks ([`super::api`]). Past the budget, a
//!   connection is answered `503 TOO_MANY_CONNECTIONS` and closed. What they
//!   see is counted in the gateway's metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

pub use crate::net::httpd::Acceptor;
use crate::net::httpd::{Limits, Observer, Refusal};

use super::Gateway;

/// Descriptors kept out of both budgets: the listeners, the runtime's own,
/// stdio, certificate reloads, and connections being refused (32 at most).
pub const FD_RESERVE: u64 = 128;

/// Each listener's budget when `max_connections` is not set and the
/// descriptor limit allows it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// How often a full tunnel budget is logged at most.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error(
        "tunnel.max_connections ({tunnel}) + api.max_connections ({api}) + {FD_RESERVE} \
         descriptors the gateway keeps need {needed} file descriptors; the limit is {limit} \
         (RLIMIT_NOFILE): lower the budgets or raise the limit (LimitNOFILE=)"
    )]
    TooLarge {
        tunnel: usize,
        api: usize,
        needed: u64,
        limit: u64,
    },
}

/// The two listeners' connection budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub tunnel: usize,
    pub api: usize,
    /// The descriptor limit they fit in.
    pub nofile: u64,
}

impl Budgets {
    /// Raises the soft descriptor limit to the hard one (a gateway that holds
    /// connections has no use for the 1024 a login shell gets) and fits the
    /// budgets in it.
    pub fn resolve(tunnel: Option<usize>, api: Option<usize>) -> Result<Budgets, BudgetError> {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let nofile = match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft < hard => {
                match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    Ok(()) => hard,
                    Err(e) => {
                        tracing::warn!(error = %e, soft, hard, "raising the descriptor limit");
                        soft
                    }
                }
            }
            Ok((soft, _)) => soft,
            Err(e) => {
                tracing::warn!(error = %e, "reading the descriptor limit; assuming 1024");
                1024
            }
        };
        Budgets::split(nofile, tunnel, api)
    }

    /// Fits the budgets in `nofile` descriptors; an unset one gets
    /// [`DEFAULT_MAX_CONNECTIONS`] or half of what the limit leaves.
    pub fn split(
        nofile: u64,
        tunnel: Option<usize>,
        api: Option<usize>,
    ) -> Result<Budgets, BudgetError> {
        let half = (nofile.saturating_sub(FD_RESERVE) / 2).min(DEFAULT_MAX_CONNECTIONS as u64);
        let half = usize::try_from(half).unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let (tunnel, api) = (tunnel.unwrap_or(half), api.unwrap_or(half));
        let needed = tunnel as u64 + api as u64 + FD_RESERVE;
        if tunnel == 0 || api == 0 || needed > nofile {
            return Err(BudgetError::TooLarge {
                tunnel,
                api,
                needed,
                limit: nofile,
            });
        }
        Ok(Budgets {
            tunnel,
            api,
            nofile,
        })
    }
}

/// Refuses tunnel connections over the budget and logs it at most every 5 s.
pub struct TunnelGate {
    permits: Arc<Semaphore>,
    max: usize,
    last_log: Option<Instant>,
}

impl TunnelGate {
    pub fn new(max: usize) -> TunnelGate {
        TunnelGate {
            permits: Arc::new(Semaphore::new(max)),
            max,
            last_log: None,
        }
    }

    /// A slot for a new tunnel connection, held as long as it lives; `None`
    /// when all are taken (the connection is then dropped unanswered: it is
    /// not yet authenticated).
    pub fn admit(
        &mut self,
        gw: &Gateway,
        peer: SocketAddr,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                gw.metrics.tunnel_rejected("limit");
                let now = Instant::now();
                if self
                    .last_log
                    .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
                {
                    tracing::warn!(%peer, max = self.max, "tunnel.max_connections reached; closing new tunnel connections");
                    self.last_log = Some(now);
                }
                None
            }
        }
    }
}

/// The API listener's settings.
pub type ApiLimits = Limits;

/// The gateway counts what its listeners see.
impl Observer for Gateway {
    fn accept_failed(&self, listener: &'static str) {
        self.metrics.accept_error(listener);
    }

    fn connection_opened(&self) {
        self.metrics.api_connection_opened();
    }

    fn connection_closed(&self) {
        self.metrics.api_connection_closed();
    }

    fn connection_refused(&self) {
        self.metrics.api_connection_refused();
    }

    fn connection_timed_out(&self, reason: &'static str) {
        self.metrics.api_connection_timed_out(reason);
    }
}

/// Serves the HTTP API on `listener` until `stop`, then lets requests in
/// flight finish for up to 10 s.
pub async fn serve_api(
    listener: TcpListener,
    router: axum::Router,
    limits: ApiLimits,
    gw: Arc<Gateway>,
    stop: watch::Receiver<bool>,
) {
    let body = serde_json::json!({"type": "error", "error": {
        "type": "TOO_MANY_CONNECTIONS",
        "message": format!(
            "the gateway's API holds its limit of {} connections (api.max_connections); retry shortly",
            limits.max_connections
        ),
    }})
    .to_string();
    let refusal = Refusal {
        content_type: "application/json",
        body,
    };
    crate::net::httpd::serve(listener, "api", router, limits, refusal, gw, stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_fit_the_descriptor_limit() {
        assert_eq!(
            Budgets::split(1 << 20, None, None),
            Ok(Budgets {
                tunnel: 1024,
                api: 1024,
                nofile: 1 << 20
            })
        );
        // A low limit: half of what the reserve leaves, each.
        assert_eq!(
            Budgets::split(1024, None, None).map(|b| (b.tunnel, b.api)),
            Ok((448, 448))
        );
        assert_eq!(
            Budgets::split(1 << 20, Some(10), Some(50_000)).map(|b| (b.tunnel, b.api)),
            Ok((10, 50_000))
        );
        let e = Budgets::split(1024, Some(900), None).unwrap_err();
        assert!(
            e.to_string().contains("tunnel.max_connections (900)"),
            "{e}"
        );
        assert!(Budgets::split(100, None, None).is_err());
    }
}
