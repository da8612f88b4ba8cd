//! Validation of tool inputs: pydantic v2 `validate_call` in lax mode, as the SDK runs it.
//!
//! The SDK validates each call against the tool function's signature; any failure
//! (a required field missing, a value of the wrong type, an unknown field) is the
//! single text `ValueError('Invalid arguments for function <name>')` (contract §6.1).
//! Lax mode coerces some values (contract §13.9), reproduced here rule by rule from
//! pydantic-core and checked against pydantic 2.13 (see the table in the tests):
//!
//! - `str`: only JSON strings.
//! - `int`: integers; `true`/`false` as 1/0; floats with no fractional part inside
//!   the `i64` range; strings in pydantic's integer syntax (surrounding Unicode
//!   whitespace, a sign, `_` between digits, leading zeros, a `.0…` suffix).
//! - `bool`: booleans; the integers 0/1 and floats 0.0/1.0; the strings `0 1 f t n y
//!   no on off yes true false` in any letter case, without surrounding spaces.
//! - `Optional[...]`: `null` is "not given".
//!
//! Python integers are unbounded; hands saturates them to `i64`, which no caller can
//! tell apart (line numbers and milliseconds that large mean "to the end"/"forever").
//! A JSON integer beyond `u64` reaches hands as a float and is refused unless it is
//! integral and within `i64`, where Python would accept it (the only divergence).
//!
//! The runner turns the input into an object first: `[]` becomes `{}` and a list of
//! pairs becomes an object (a pair with a non-string key then fails with Python's
//! `TypeError('keywords must be strings')`). Where the SDK fails the whole work item
//! (`null`, a string, any other list) hands answers with the `ValueError` text.

use serde_json::{Map, Value};

use super::ToolResult;

/// Inputs of `bash`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BashInput {
    pub command: Option<String>,
    pub restart: Option<bool>,
    pub timeout_ms: Option<i64>,
}

/// Inputs of `read`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadInput {
    pub file_path: String,
    pub view_range: Option<Vec<i64>>,
}

/// Inputs of `write`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteInput {
    pub file_path: String,
    pub content: String,
}

/// Inputs of `edit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditInput {
    pub file_path: String,
    pub old_string: String,
    pub new_string: String,
    pub replace_all: Option<bool>,
}

/// Inputs of `glob`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobInput {
    pub pattern: String,
    pub path: Option<String>,
}

/// What grep prints per hit (hands extension `output_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// Matching lines (the contract's only shape).
    #[default]
    Content,
    /// One path per file with a match (`rg -l`).
    FilesWithMatches,
    /// `path:count` per file with a match (`rg -c`).
    Count,
}

/// Inputs of `grep`: the contract's `pattern` and `path`, plus hands' optional
/// extensions, which keep the default output shape when absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrepInput {
    pub pattern: String,
    pub path: Option<String>,
    /// `glob`: include (or, with a leading `!`, exclude) files by glob, like `rg -g`.
    pub glob: Option<String>,
    /// `type`: a ripgrep file type such as `rust` (`rg -t`).
    pub file_type: Option<String>,
    /// `-i`: case-insensitive.
    pub case_insensitive: bool,
    /// `-n`: line numbers (default on, as the SDK's `rg -n`).
    pub line_numbers: bool,
    /// `-A`, `-B`, `-C`: context lines after, before, around.
    pub after: Option<u64>,
    pub before: Option<u64>,
    pub context: Option<u64>,
    /// `multiline`: patterns may span lines and `.` matches newlines (`rg -U
    /// --multiline-dotall`).
    pub multiline: bool,
    pub output_mode: OutputMode,
    /// `head_limit`: keep only the first N lines of output (0 = all).
    pub head_limit: Option<u64>,
}

/// The SDK's text for a failed validation.
pub fn invalid(tool: &str) -> ToolResult {
    ToolResult::err(format!(
        "ValueError('Invalid arguments for function {tool}')"
    ))
}

pub fn parse_bash(input: &Value) -> Result<BashInput, ToolResult> {
    let mut args = Args::new("bash", input)?;
    let parsed = BashInput {
        command: args.opt_str("command"),
        restart: args.opt_bool("restart"),
        timeout_ms: args.opt_int("timeout_ms"),
    };
    args.finish(parsed)
}

pub fn parse_read(input: &Value) -> Result<ReadInput, ToolResult> {
    let mut args = Args::new("read", input)?;
    let parsed = ReadInput {
        file_path: args.req_str("file_path"),
        view_range: args.opt_int_list("view_range"),
    };
    args.finish(parsed)
}

pub fn parse_write(input: &Value) -> Result<WriteInput, ToolResult> {
    let mut args = Args::new("write", input)?;
    let parsed = WriteInput {
        file_path: args.req_str("file_path"),
        content: args.req_str("content"),
    };
    args.finish(parsed)
}

pub fn parse_edit(input: &Value) -> Result<EditInput, ToolResult> {
    let mut args = Args::new("edit", input)?;
    let parsed = EditInput {
        file_path: args.req_str("file_path"),
        old_string: args.req_str("old_string"),
        new_string: args.req_str("new_string"),
        replace_all: args.opt_bool("replace_all"),
    };
    args.finish(parsed)
}

pub fn parse_glob(input: &Value) -> Result<GlobInput, ToolResult> {
    let mut args = Args::new("glob", input)?;
    let parsed = GlobInput {
        pattern: args.req_str("pattern"),
        path: args.opt_str("path"),
    };
    args.finish(parsed)
}

pub fn parse_grep(input: &Value) -> Result<GrepInput, ToolResult> {
    let mut args = Args::new("grep", input)?;
    let output_mode = match args.opt_str("output_mode").as_deref() {
        None | Some("content") => OutputMode::Content,
        Some("files_with_matches") => OutputMode::FilesWithMatches,
        Some("count") => OutputMode::Count,
        Some(_) => {
            args.bad = true;
            OutputMode::Content
        }
    };
    let parsed = GrepInput {
        pattern: args.req_str("pattern"),
        path: args.opt_str("path"),
        glob: args.opt_str("glob"),
        file_type: args.opt_str("type"),
        case_insensitive: args.opt_bool("-i").unwrap_or(false),
        line_numbers: args.opt_bool("-n").unwrap_or(true),
        after: args.opt_count("-A"),
        before: args.opt_count("-B"),
        context: args.opt_count("-C"),
        multiline: args.opt_bool("multiline").unwrap_or(false),
        output_mode,
        head_limit: args.opt_count("head_limit"),
    };
    args.finish(parsed)
}

/// The keyword arguments of one call, consumed field by field; whatever is left at
/// the end is an unknown field.
struct Args {
    tool: &'static str,
    fields: Map<String, Value>,
    bad: bool,
}

impl Args {
    fn new(tool: &'static str, input: &Value) -> Result<Args, ToolResult> {
        let fields = match input {
            Value::Object(map) => map.clone(),
            Value::Array(items) => pairs_to_object(tool, items)?,
            _ => return Err(invalid(tool)),
        };
        Ok(Args {
            tool,
            fields,
            bad: false,
        })
    }

    fn finish<T>(self, parsed: T) -> Result<T, ToolResult> {
        if self.bad || !self.fields.is_empty() {
            Err(invalid(self.tool))
        } else {
            Ok(parsed)
        }
    }

    /// The value of an optional field, `None` when absent or `null`.
    fn take(&mut self, key: &str) -> Option<Value> {
        match self.fields.remove(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn req_str(&mut self, key: &str) -> String {
        match self.fields.remove(key) {
            Some(Value::String(s)) => s,
            _ => {
                self.bad = true;
                String::new()
            }
        }
    }

    fn opt_str(&mut self, key: &str) -> Option<String> {
        match self.take(key)? {
            Value::String(s) => Some(s),
            _ => {
                self.bad = true;
                None
            }
        }
    }

    fn opt_bool(&mut self, key: &str) -> Option<bool> {
        let value = self.take(key)?;
        let parsed = lax_bool(&value);
        self.bad |= parsed.is_none();
        parsed
    }

    fn opt_int(&mut self, key: &str) -> Option<i64> {
        let value = self.take(key)?;
        let parsed = lax_int(&value);
        self.bad |= parsed.is_none();
        parsed
    }

    /// A non-negative integer (hands' grep extensions).
    fn opt_count(&mut self, key: &str) -> Option<u64> {
        let n = self.opt_int(key)?;
        match u64::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.bad = true;
                None
            }
        }
    }

    fn opt_int_list(&mut self, key: &str) -> Option<Vec<i64>> {
        let parsed = match self.take(key)? {
            Value::Array(items) => items.iter().map(lax_int).collect::<Option<Vec<_>>>(),
            _ => None,
        };
        self.bad |= parsed.is_none();
        parsed
    }
}

/// Python's `dict(list)`: each item must be a pair (a two-item list, or a string of
/// two characters); later keys win.
fn pairs_to_object(tool: &str, items: &[Value]) -> Result<Map<String, Value>, ToolResult> {
    let mut map = Map::new();
    let mut non_string_key = false;
    for item in items {
        let (key, value) = match item {
            Value::Array(pair) if pair.len() == 2 => (pair[0].clone(), pair[1].clone()),
            Value::String(s) if s.chars().count() == 2 => {
                let mut chars = s.chars();
                let (Some(a), Some(b)) = (chars.next(), chars.next()) else {
                    return Err(invalid(tool));
                };
                (Value::String(a.into()), Value::String(b.into()))
            }
            _ => return Err(invalid(tool)),
        };
        match key {
            Value::String(key) => {
                map.insert(key, value);
            }
            // Hashable but not a keyword: Python fails at the call, inside the
            // runner's error handling.
            Value::Null | Value::Bool(_) | Value::Number(_) => non_string_key = true,
            // Unhashable: `dict()` itself raises, outside it.
            Value::Array(_) | Value::Object(_) => return Err(invalid(tool)),
        }
    }
    if non_string_key {
        return Err(ToolResult::err("TypeError('keywords must be strings')"));
    }
    Ok(map)
}

/// pydantic's lax `bool`.
pub fn lax_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i {
                    0 => Some(false),
                    1 => Some(true),
                    _ => None,
                }
            } else if n.is_u64() {
                None
            } else {
                let f = n.as_f64()?;
                if f == 0.0 {
                    Some(false)
                } else if f == 1.0 {
                    Some(true)
                } else {
                    None
                }
            }
        }
        Value::String(s) => str_as_bool(s),
        _ => None,
    }
}

fn str_as_bool(s: &str) -> Option<bool> {
    const FALSE: [&str; 6] = ["0", "f", "n", "no", "off", "false"];
    const TRUE: [&str; 6] = ["1", "t", "y", "on", "yes", "true"];
    if FALSE.iter().any(|w| s.eq_ignore_ascii_case(w)) {
        Some(false)
    } else if TRUE.iter().any(|w| s.eq_ignore_ascii_case(w)) {
        Some(true)
    } else {
        None
    }
}

/// pydantic's lax `int`, saturated to `i64`.
pub fn lax_int(value: &Value) -> Option<i64> {
    match value {
        Value::Bool(b) => Some(i64::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i)
            } else if n.is_u64() {
                Some(i64::MAX)
            } else {
                float_as_int(n.as_f64()?)
            }
        }
        Value::String(s) => str_as_int(s),
        _ => None,
    }
}

fn float_as_int(f: f64) -> Option<i64> {
    // The bounds are exclusive, as in pydantic-core.
    if !f.is_finite() || f.fract() != 0.0 || f <= i64::MIN as f64 || f >= i64::MAX as f64 {
        return None;
    }
    Some(f as i64)
}

/// pydantic-core's `str_as_int`: a JSON integer as is, else the string cleaned of
/// whitespace, `+`, leading zeros, a `.000` suffix and `_` separators, then parsed.
fn str_as_int(s: &str) -> Option<i64> {
    if is_json_int(s) {
        return json_int(s);
    }
    json_int(&clean_int_str(s)?)
}

fn is_json_int(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    match digits.as_bytes() {
        [] => false,
        [b'0'] => true,
        [b'0', ..] => false,
        bytes => bytes.iter().all(u8::is_ascii_digit),
    }
}

/// Parse a JSON integer, saturating; pydantic refuses more than 4300 digits.
fn json_int(s: &str) -> Option<i64> {
    if !is_json_int(s) || s.len() > 4300 {
        return None;
    }
    match s.parse::<i64>() {
        Ok(n) => Some(n),
        Err(_) if s.starts_with('-') => Some(i64::MIN),
        Err(_) => Some(i64::MAX),
    }
}

fn clean_int_str(input: &str) -> Option<String> {
    let len_before = input.len();
    let mut s = input.trim();
    if let Some(rest) = s.strip_prefix('+') {
        if rest.starts_with('-') {
            return None;
        }
        s = rest;
    }
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        if rest.starts_with('-') || rest.starts_with('+') {
            return None;
        }
        negative = true;
        s = rest;
    }
    s = strip_leading_zeros(s)?;
    if let Some(dot) = s.find('.') {
        let decimals = &s[dot + 1..];
        if !decimals.is_empty() && decimals.bytes().all(|b| b == b'0') {
            s = &s[..dot];
        }
    }
    let sign = if negative { "-" } else { "" };
    if let Some(stripped) = strip_underscores(s) {
        return Some(format!("{sign}{stripped}"));
    }
    if len_before == s.len() {
        return None;
    }
    Some(format!("{sign}{s}"))
}

/// Leading zeros (and `_` among them) dropped, keeping one digit before a `.` or at
/// the end; pydantic-core keeps its quirk that a `-` after the zeros survives
/// (`"0-5"` is -5).
fn strip_leading_zeros(s: &str) -> Option<&str> {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, '0')) => {}
        Some((_, c)) if c.is_ascii_digit() || c == '-' => return Some(s),
        _ => return None,
    }
    for (i, c) in chars {
        match c {
            '0' | '_' => {}
            '1'..='9' | '-' => return Some(&s[i..]),
            '.' => return Some(&s[i - 1..]),
            _ => return None,
        }
    }
    Some(&s[s.len() - 1..])
}

fn strip_underscores(s: &str) -> Option<String> {
    if s.starts_with('_') || s.ends_with('_') || !s.contains('_') || s.contains("__") {
        None
    } else {
        Some(s.replace('_', ""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(r: ToolResult) -> String {
        r.text_content()
    }

    /// Each row was checked against `pydantic.validate_call` (pydantic 2.13, lax).
    #[test]
    fn int_coercion_table() {
        let ok: &[(Value, i64)] = &[
            (json!(0), 0),
            (json!(-1), -1),
            (json!(true), 1),
            (json!(false), 0),
            (json!(2.0), 2),
            (json!(-0.0), 0),
            (json!("2"), 2),
            (json!(" 3 "), 3),
            (json!("\t3\n"), 3),
            (json!("\u{a0}3"), 3),
            (json!("\u{3000}3"), 3),
            (json!("3\r"), 3),
            (json!("3.0"), 3),
            (json!("3.00"), 3),
            (json!("+4"), 4),
            (json!("-5"), -5),
            (json!("1_000"), 1000),
            (json!("1_0.0"), 10),
            (json!("10_0.00"), 100),
            (json!("00012"), 12),
            (json!("0_1"), 1),
            (json!("-0.0"), 0),
            (json!("0-2013"), -2013),
            (json!("0__9"), 9),
            (json!("0-_93"), -93),
            (json!("  -1.000  "), -1),
            (json!("9223372036854775807"), i64::MAX),
            (json!("9223372036854775808"), i64::MAX),
            (json!("-9223372036854775809"), i64::MIN),
            (json!(u64::MAX), i64::MAX),
        ];
        for (value, want) in ok {
            assert_eq!(lax_int(value), Some(*want), "int from {value}");
        }
        let bad = [
            json!(1.5),
            json!(1e20),
            json!(null),
            json!(""),
            json!(" "),
            json!("3."),
            json!(".0"),
            json!("3.5"),
            json!("1e3"),
            json!("0x10"),
            json!("_1"),
            json!("1_"),
            json!("1__0"),
            json!("1.0_0"),
            json!("1.5_0"),
            json!("-_1"),
            json!("- 3"),
            json!("+-3"),
            json!("--1"),
            json!("1-2"),
            json!("-0-1"),
            json!("\u{1c}3"),
            json!("\u{663}"),
            json!("yes"),
            json!([1]),
            json!({}),
        ];
        for value in bad {
            assert_eq!(lax_int(&value), None, "int from {value}");
        }
    }

    #[test]
    fn bool_coercion_table() {
        let ok: &[(Value, bool)] = &[
            (json!(true), true),
            (json!(0), false),
            (json!(1), true),
            (json!(1.0), true),
            (json!(-0.0), false),
            (json!("0"), false),
            (json!("1"), true),
            (json!("yes"), true),
            (json!("No"), false),
            (json!("oN"), true),
            (json!("OFF"), false),
            (json!("t"), true),
            (json!("F"), false),
            (json!("Y"), true),
            (json!("n"), false),
            (json!("TRUE"), true),
            (json!("false"), false),
        ];
        for (value, want) in ok {
            assert_eq!(lax_bool(value), Some(*want), "bool from {value}");
        }
        let bad = [
            json!(2),
            json!(-1),
            json!(2.0),
            json!(0.5),
            json!(""),
            json!(" true"),
            json!("true "),
            json!("1.0"),
            json!("2"),
            json!([true]),
        ];
        for value in bad {
            assert_eq!(lax_bool(&value), None, "bool from {value}");
        }
    }

    #[test]
    fn read_inputs() {
        let r = parse_read(&json!({"file_path": "a", "view_range": ["2", "3"]})).expect("ok");
        assert_eq!(r.view_range, Some(vec![2, 3]));
        let r = parse_read(&json!({"file_path": "a", "view_range": [true, 2.0]})).expect("ok");
        assert_eq!(r.view_range, Some(vec![1, 2]));
        let r = parse_read(&json!({"file_path": "a", "view_range": null})).expect("ok");
        assert_eq!(r.view_range, None);
        let invalid_read = "ValueError('Invalid arguments for function read')";
        for bad in [
            json!({}),
            json!({"file_path": null}),
            json!({"file_path": 1}),
            json!({"file_path": "a", "x": 1}),
            json!({"file_path": "a", "view_range": "1"}),
            json!({"file_path": "a", "view_range": [1.5]}),
            json!({"file_path": "a", "view_range": [null]}),
            json!([]),
            json!(null),
            json!("a"),
            json!(["fi"]),
        ] {
            let err = parse_read(&bad).expect_err("invalid");
            assert!(err.is_error);
            assert_eq!(text(err), invalid_read, "input {bad}");
        }
        let r = parse_read(&json!([["file_path", "f.txt"]])).expect("pairs");
        assert_eq!(r.file_path, "f.txt");
        let err = parse_read(&json!([[1, "f.txt"]])).expect_err("non-string key");
        assert_eq!(text(err), "TypeError('keywords must be strings')");
    }

    #[test]
    fn bash_inputs() {
        assert_eq!(
            parse_bash(&json!({"command": null})).expect("ok"),
            BashInput::default()
        );
        let b = parse_bash(&json!({"command": "ls", "restart": "no", "timeout_ms": "5000"}))
            .expect("ok");
        assert_eq!(b.command.as_deref(), Some("ls"));
        assert_eq!(b.restart, Some(false));
        assert_eq!(b.timeout_ms, Some(5000));
        assert_eq!(parse_bash(&json!({})).expect("empty"), BashInput::default());
        assert_eq!(
            parse_bash(&json!([])).expect("[] is {}"),
            BashInput::default()
        );
        for bad in [
            json!({"restart": 2}),
            json!({"command": 1}),
            json!({"timeout_ms": 1.5}),
            json!({"cmd": "ls"}),
        ] {
            assert_eq!(
                text(parse_bash(&bad).expect_err("invalid")),
                "ValueError('Invalid arguments for function bash')"
            );
        }
    }

    #[test]
    fn other_tools_accept_only_their_fields() {
        assert!(parse_write(&json!({"file_path": "a", "content": ""})).is_ok());
        assert!(parse_write(&json!({"file_path": "a"})).is_err());
        let e = parse_edit(
            &json!({"file_path": "a", "old_string": "x", "new_string": "y",
            "replace_all": "yes"}),
        )
        .expect("ok");
        assert_eq!(e.replace_all, Some(true));
        assert!(parse_edit(&json!({"file_path": "a", "old_string": "x"})).is_err());
        assert!(parse_glob(&json!({"pattern": "*", "path": null})).is_ok());
        assert!(parse_glob(&json!({"pattern": "*", "glob": "x"})).is_err());
        assert!(parse_read(&json!({"file_path": "a", "-i": true})).is_err());
    }

    #[test]
    fn grep_extensions() {
        let g = parse_grep(&json!({"pattern": "x"})).expect("ok");
        assert!(g.line_numbers && !g.case_insensitive && !g.multiline);
        assert_eq!(g.output_mode, OutputMode::Content);
        let g = parse_grep(
            &json!({"pattern": "x", "glob": "*.rs", "type": "rust", "-i": true,
            "-n": false, "-A": 1, "-B": "2", "-C": 3, "multiline": true,
            "output_mode": "count", "head_limit": 10}),
        )
        .expect("ok");
        assert_eq!(g.glob.as_deref(), Some("*.rs"));
        assert_eq!(g.file_type.as_deref(), Some("rust"));
        assert!(g.case_insensitive && !g.line_numbers && g.multiline);
        assert_eq!((g.after, g.before, g.context), (Some(1), Some(2), Some(3)));
        assert_eq!(g.output_mode, OutputMode::Count);
        assert_eq!(g.head_limit, Some(10));
        for bad in [
            json!({"pattern": "x", "-A": -1}),
            json!({"pattern": "x", "output_mode": "lines"}),
            json!({"pattern": "x", "-o": true}),
            json!({"path": "x"}),
        ] {
            assert_eq!(
                text(parse_grep(&bad).expect_err("invalid")),
                "ValueError('Invalid arguments for function grep')"
            );
        }
    }
}
