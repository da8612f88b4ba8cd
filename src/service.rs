//! `hands.v1.Sandbox` (proto/hands/v1/sandbox.proto) over the session registry:
//! the service a brain calls, whichever way it reaches the worker (the outbound
//! tunnel, or the loopback debug listener).
//!
//! Errors are gRPC statuses with a machine-readable reason in the `hands-reason`
//! trailer; tool-level failures are normal results with `is_error`.
//!
//! Not yet here (issue 4 continues): the call journal behind at-most-once
//! execution across reconnects (`Attach`, repeated `Call`), `Cancel`, deadlines
//! that kill the call, and streamed bash output. Those RPCs answer UNIMPLEMENTED.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::proto::v1;
use crate::session::registry::{valid_id, Registry, RegistryError};

/// The trailer that carries an error's machine-readable reason.
pub const REASON: &str = "hands-reason";

/// A status with its reason in the `hands-reason` trailer.
pub fn status(code: Code, reason: &'static str, message: impl Into<String>) -> Status {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(REASON, tonic::metadata::MetadataValue::from_static(reason));
    Status::with_metadata(code, message, md)
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        let (code, reason) = match &e {
            RegistryError::InvalidId(_) => (Code::InvalidArgument, "INVALID_ID"),
            RegistryError::UnknownEnvironment(_) => (Code::NotFound, "UNKNOWN_ENVIRONMENT"),
            RegistryError::EnvironmentMismatch { .. } => {
                (Code::AlreadyExists, "SESSION_ENVIRONMENT_MISMATCH")
            }
            RegistryError::AtCapacity(_) => (Code::ResourceExhausted, "AT_CAPACITY"),
            RegistryError::SessionNotFound(_) => (Code::NotFound, "SESSION_NOT_FOUND"),
            RegistryError::Open(_) => (Code::FailedPrecondition, "SANDBOX_UNAVAILABLE"),
        };
        status(code, reason, e.to_string())
    }
}

/// The confinement this kernel gives every session (for `Info`).
pub fn detect_isolation() -> v1::Isolation {
    v1::Isolation {
        landlock_abi: crate::sandbox::sys::landlock_abi().unwrap_or(0),
        seccomp: crate::sandbox::seccomp::programs().is_ok(),
        cgroup_version: match crate::sandbox::cgroup::Cgroups::detect().map(|c| c.version()) {
            Ok(crate::sandbox::cgroup::CgroupVersion::V1) => "v1".into(),
            Ok(crate::sandbox::cgroup::CgroupVersion::V2) => "v2".into(),
            Err(_) => String::new(),
        },
        namespaces: ["mnt", "pid", "net", "ipc", "uts"]
            .map(String::from)
            .to_vec(),
    }
}

/// The service: one per worker, shared by every connection.
pub struct SandboxService {
    registry: Arc<Registry>,
    worker_id: String,
    isolation: v1::Isolation,
}

impl SandboxService {
    pub fn new(registry: Arc<Registry>, worker_id: String, isolation: v1::Isolation) -> Self {
        SandboxService {
            registry,
            worker_id,
            isolation,
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> v1::sandbox_server::SandboxServer<SandboxService> {
        v1::sandbox_server::SandboxServer::new(self)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::CallEvent, Status>> + Send>>;

fn event(e: v1::call_event::Event) -> v1::CallEvent {
    v1::CallEvent { event: Some(e) }
}

#[tonic::async_trait]
impl v1::sandbox_server::Sandbox for SandboxService {
    async fn info(
        &self,
        _req: Request<v1::InfoRequest>,
    ) -> Result<Response<v1::InfoResponse>, Status> {
        let environments = self
            .registry
            .environments()
            .map(|p| v1::Environment {
                name: p.name.clone(),
                description: p.description.clone().unwrap_or_default(),
                tools: p.tools.iter().map(|t| t.name().to_string()).collect(),
                network: p.network.mode.name().to_string(),
                memory_bytes: p.limits.memory_bytes,
                pids: p.limits.pids,
                cpu: p.limits.cpu,
                bash_timeout_ms: p.limits.bash_timeout.as_millis() as u64,
                call_timeout_ms: p.limits.call_timeout.as_millis() as u64,
            })
            .collect();
        Ok(Response::new(v1::InfoResponse {
            worker_id: self.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocols: vec!["hands.v1".to_string()],
            environments,
            capacity: self.registry.capacity() as u32,
            open_sessions: self.registry.open_sessions() as u32,
            isolation: Some(self.isolation.clone()),
        }))
    }

    async fn open_session(
        &self,
        req: Request<v1::OpenSessionRequest>,
    ) -> Result<Response<v1::OpenSessionResponse>, Status> {
        let r = req.into_inner();
        let (_, created) = self.registry.open(&r.session_id, &r.environment).await?;
        Ok(Response::new(v1::OpenSessionResponse {
            session_id: r.session_id,
            created,
            environment: r.environment,
            worker_id: self.worker_id.clone(),
        }))
    }

    async fn close_session(
        &self,
        req: Request<v1::CloseSessionRequest>,
    ) -> Result<Response<v1::CloseSessionResponse>, Status> {
        let r = req.into_inner();
        if !valid_id(&r.session_id) {
            return Err(RegistryError::InvalidId(r.session_id).into());
        }
        Ok(Response::new(v1::CloseSessionResponse {
            closed: self.registry.close(&r.session_id),
        }))
    }

    type CallStream = EventStream;

    async fn call(&self, req: Request<v1::CallRequest>) -> Result<Response<EventStream>, Status> {
        let r = req.into_inner();
        if !valid_id(&r.call_id) {
            return Err(RegistryError::InvalidId(r.call_id).into());
        }
        let session = self.registry.get(&r.session_id)?;
        let input: serde_json::Value = serde_json::from_str(&r.input_json).map_err(|e| {
            status(
                Code::InvalidArgument,
                "INVALID_INPUT_JSON",
                format!("input_json is not JSON: {e}"),
            )
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // The call runs on its own task: a client that goes away does not stop it.
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(event(v1::call_event::Event::Started(v1::Started {
                    call_id: r.call_id.clone(),
                    executed_now: true,
                }))))
                .await;
            let result = session.call_traced(&r.tool, &input, &r.call_id).await;
            let fin = crate::proto::finished(&result, v1::Outcome::Completed);
            let _ = tx
                .send(Ok(event(v1::call_event::Event::Finished(fin))))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type AttachStream = EventStream;

    async fn attach(
        &self,
        _req: Request<v1::AttachRequest>,
    ) -> Result<Response<EventStream>, Status> {
        Err(status(
            Code::Unimplemented,
            "UNIMPLEMENTED",
            "Attach needs the call journal",
        ))
    }

    async fn cancel(
        &self,
        _req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        Err(status(
            Code::Unimplemented,
            "UNIMPLEMENTED",
            "Cancel needs the call journal",
        ))
    }
}
