//! Path resolution (stub).
pub fn py_repr(s: &str) -> String {
    format!("'{s}'")
}
