//! The six tools of `agent_toolset_20260401`: names, inputs, results.
//!
//! A tool call is `{name, input}` → [`ToolResult`] (`content` blocks plus `is_error`),
//! with the inputs, defaults, limits and result texts of the official SDK worker
//! (contract §6). `bash` is driven from the worker side (see [`bash`]); the five file
//! tools run inside the session's confined helper process (see [`fs`]), so the kernel,
//! not a path check, is the boundary.

pub mod bash;
pub mod edit;
pub mod fs;
pub mod glob;
pub mod grep;
pub mod input;
pub mod path;
pub mod read;
pub mod walk;
pub mod write;

use serde::{Deserialize, Serialize};

/// Every tool hands offers. Adding a tool means adding a variant; the compiler shows
/// every place to touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    Bash,
    Read,
    Write,
    Edit,
    Glob,
    Grep,
}

impl Tool {
    pub const ALL: [Tool; 6] = [
        Tool::Bash,
        Tool::Read,
        Tool::Write,
        Tool::Edit,
        Tool::Glob,
        Tool::Grep,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Bash => "bash",
            Tool::Read => "read",
            Tool::Write => "write",
            Tool::Edit => "edit",
            Tool::Glob => "glob",
            Tool::Grep => "grep",
        }
    }

    pub fn from_name(name: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The file tools run inside the session helper; bash is driven by the worker.
    pub fn is_file_tool(self) -> bool {
        !matches!(self, Tool::Bash)
    }
}

/// A base64 source of an `image` or `document` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base64Source {
    #[serde(rename = "type")]
    pub kind: String,
    pub media_type: String,
    pub data: String,
}

/// One content block of a tool result, serialised exactly as the Messages API wants it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentBlock {
    Text { text: String },
    Image { source: Base64Source },
    Document { source: Base64Source },
}

/// The result of one tool call: never empty content (an empty text becomes
/// `(no output)`, contract §4.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolResult {
    pub content: Vec<ContentBlock>,
    pub is_error: bool,
}

/// The text shown for empty successful (or failed) output.
pub const NO_OUTPUT: &str = "(no output)";

impl ToolResult {
    /// A successful text result; empty text becomes `(no output)`.
    pub fn ok(text: impl Into<String>) -> ToolResult {
        ToolResult::text(text.into(), false)
    }

    /// A failed text result; empty text becomes `(no output)`.
    pub fn err(text: impl Into<String>) -> ToolResult {
        ToolResult::text(text.into(), true)
    }

    fn text(text: String, is_error: bool) -> ToolResult {
        let text = if text.is_empty() {
            NO_OUTPUT.to_string()
        } else {
            text
        };
        ToolResult {
            content: vec![ContentBlock::Text { text }],
            is_error,
        }
    }

    /// A successful result made of one non-text block (image or document).
    pub fn block(block: ContentBlock) -> ToolResult {
        ToolResult {
            content: vec![block],
            is_error: false,
        }
    }

    /// Adds `note` as a line of its own after the result's text (in place of
    /// `(no output)`).
    pub fn append_note(&mut self, note: &str) {
        match self.content.last_mut() {
            Some(ContentBlock::Text { text }) if text == NO_OUTPUT => *text = note.to_string(),
            Some(ContentBlock::Text { text }) => {
                text.push('\n');
                text.push_str(note);
            }
            _ => self.content.push(ContentBlock::Text {
                text: note.to_string(),
            }),
        }
    }

    /// The concatenated text of all text blocks (for tests and the CLI).
    pub fn text_content(&self) -> String {
        self.content
            .iter()
            .filter_map(|b| match b {
                ContentBlock::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("")
    }

    /// The heap memory this result holds (its texts and base64 data), for the
    /// call journal's byte budget.
    pub fn heap_bytes(&self) -> usize {
        let blocks = self.content.capacity() * std::mem::size_of::<ContentBlock>();
        blocks
            + self
                .content
                .iter()
                .map(|b| match b {
                    ContentBlock::Text { text } => text.capacity(),
                    ContentBlock::Image { source } | ContentBlock::Document { source } => {
                        source.kind.capacity()
                            + source.media_type.capacity()
                            + source.data.capacity()
                    }
                })
                .sum::<usize>()
    }
}

/// The contract's runner-level text when a call outlives the call timeout.
pub fn timed_out(tool: &str) -> ToolResult {
    ToolResult::err(format!("tool {} timed out", path::py_repr(tool)))
}

/// The message of a caught panic, for the error result that replaces it.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}
