//! Byte sizes and durations as policy files spell them, and back.
//!
//! Sizes are whole bytes (`262144`) or a whole number with a binary unit (`"256KiB"`,
//! `"1 GiB"`). Decimal units (`KB`, `MB`, `GB`) are refused rather than guessed: tools
//! disagree on whether `1GB` means 10⁹ or 2³⁰ bytes (systemd and Docker say 2³⁰, disk
//! vendors 10⁹), and a memory limit off by 7 % is the kind of surprise a policy file
//! must not hold. Durations are a whole number with `ms`, `s` or `m`.
//!
//! Parsers return a plain message; the caller wraps it with the file and key.

use std::time::Duration;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Binary units, largest first so [`format_size`] picks the largest exact one.
const SIZE_UNITS: [(&str, u64); 4] = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];

/// Splits `"256 MiB"` into `(256, "MiB")`; whitespace between the two is allowed.
fn split_number(text: &str) -> Result<(u64, &str), String> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("`{text}` does not start with a whole number"));
    }
    let number = text[..digits]
        .parse::<u64>()
        .map_err(|_| format!("`{text}` is too large"))?;
    Ok((number, text[digits..].trim_start()))
}

/// Parses a size string: `"N"`, `"NKiB"`, `"NMiB"`, `"NGiB"`, `"NTiB"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text)?;
    let multiplier = if unit.is_empty() || unit == "B" {
        1
    } else if let Some(&(_, multiplier)) = SIZE_UNITS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(unit))
    {
        multiplier
    } else if ["k", "m", "g", "t", "kb", "mb", "gb", "tb"]
        .contains(&unit.to_ascii_lowercase().as_str())
    {
        return Err(format!(
            "`{}` is ambiguous; use a binary unit (KiB, MiB, GiB, TiB)",
            text.trim()
        ));
    } else {
        return Err(format!(
            "unknown size unit `{unit}` (expected B, KiB, MiB, GiB or TiB)"
        ));
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{}` is too large", text.trim()))
}

/// Parses a duration string: `"Nms"`, `"Ns"`, `"Nm"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(text)?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "" => {
            return Err(format!(
                "`{}` has no unit (write e.g. \"120s\", \"500ms\" or \"5m\")",
                text.trim()
            ))
        }
        unit => {
            return Err(format!(
                "unknown duration unit `{unit}` (expected ms, s or m)"
            ))
        }
    };
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{}` is too large", text.trim()))
}

/// Formats a size with the largest binary unit that divides it exactly (`1 GiB`,
/// `1536 MiB`, `1000 B`), so the printed value reads back to the same number.
pub fn format_size(bytes: u64) -> String {
    SIZE_UNITS
        .iter()
        .find(|&&(_, unit)| bytes != 0 && bytes.is_multiple_of(unit))
        .map(|(name, unit)| format!("{} {name}", bytes / unit))
        .unwrap_or_else(|| format!("{bytes} B"))
}

/// Formats a duration in the policy's own units: minutes from ten minutes up when
/// whole (`30m`), else seconds when whole (`120s`, `540s`), else milliseconds.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis >= 600_000 && millis.is_multiple_of(60_000) {
        format!("{}m", millis / 60_000)
    } else if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("12B"), Ok(12));
        assert_eq!(parse_size("256KiB"), Ok(256 * KIB));
        assert_eq!(parse_size("256 MiB"), Ok(256 * MIB));
        assert_eq!(parse_size("1gib"), Ok(GIB));
        assert_eq!(parse_size("2TiB"), Ok(2 * TIB));
        assert!(parse_size("1GB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("1G").unwrap_err().contains("ambiguous"));
        assert!(parse_size("1mb").unwrap_err().contains("ambiguous"));
        assert!(parse_size("1.5GiB")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_size("GiB").unwrap_err().contains("whole number"));
        assert!(parse_size("-1").unwrap_err().contains("whole number"));
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("99999999TiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5 m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("120").unwrap_err().contains("no unit"));
        assert!(parse_duration("2h")
            .unwrap_err()
            .contains("unknown duration unit"));
        assert!(parse_duration("1.5s")
            .unwrap_err()
            .contains("unknown duration unit"));
    }

    #[test]
    fn formatting_reads_back() {
        for bytes in [0, 1000, KIB, 1536 * MIB, GIB, 3 * TIB] {
            assert_eq!(parse_size(&format_size(bytes).replace(' ', "")), Ok(bytes));
        }
        assert_eq!(format_size(GIB), "1 GiB");
        assert_eq!(format_size(1536 * MIB), "1536 MiB");
        for ms in [0, 1500, 120_000, 300_000, 1_800_000] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(150)), "150s");
        assert_eq!(format_duration(Duration::from_secs(120)), "120s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
    }
}
