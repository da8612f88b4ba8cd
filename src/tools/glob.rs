//! The glob tool (stub).
use super::{fs::FsContext, ToolResult};
use serde_json::Value;
pub fn run(_input: &Value, _ctx: &FsContext) -> ToolResult {
    ToolResult::err("unimplemented")
}
