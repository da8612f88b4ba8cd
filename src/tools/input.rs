//! Tool input validation (interim: bash only; replaced by the full pydantic-lax
//! validation).
use serde_json::Value;

use super::ToolResult;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BashInput {
    pub command: Option<String>,
    pub restart: Option<bool>,
    pub timeout_ms: Option<i64>,
}

pub fn invalid(name: &str) -> ToolResult {
    ToolResult::err(format!(
        "ValueError('Invalid arguments for function {name}')"
    ))
}

pub fn parse_bash(v: &Value) -> Result<BashInput, ToolResult> {
    let obj = match v {
        Value::Object(o) => o,
        _ => return Err(invalid("bash")),
    };
    let mut out = BashInput::default();
    for (k, val) in obj {
        match (k.as_str(), val) {
            (_, Value::Null) => {}
            ("command", Value::String(s)) => out.command = Some(s.clone()),
            ("restart", Value::Bool(b)) => out.restart = Some(*b),
            ("timeout_ms", Value::Number(n)) if n.as_i64().is_some() => out.timeout_ms = n.as_i64(),
            _ => return Err(invalid("bash")),
        }
    }
    Ok(out)
}
