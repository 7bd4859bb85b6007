//! JSON text exactly as Python's `json.dumps` writes it (what kombu and Celery put on the wire).
//!
//! Python separates items with `", "` and keys from values with `": "`, escapes every non-ASCII
//! character and DEL as `\uXXXX` (`ensure_ascii=True`), and prints floats with `repr()` (`1e-05`,
//! `1e+16`, `0.1`). Writing the same bytes lets golden fixtures of real Celery traffic round-trip
//! byte for byte. Parsing needs nothing special: `serde_json` reads any JSON.
//! Not for: deciding field order; that comes from the types (and `serde_json`'s
//! `preserve_order` for maps).

use serde::Serialize;
use serde_json::ser::Formatter;
use std::io;

/// Serializes `value` the way Python's `json.dumps(value)` would.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value.serialize(&mut ser)?;
    Ok(out)
}

/// Like [`to_vec`], as a `String`.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    let bytes = to_vec(value)?;
    // The formatter only ever writes ASCII.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A `serde_json` formatter with Python's separators, ASCII escaping and float repr.
#[derive(Debug, Clone, Copy, Default)]
pub struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(python_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(w, f64::from(value))
    }

    /// Numbers kept as text (serde_json's `arbitrary_precision`): integers as they are, floats
    /// in Python's repr.
    fn write_number_str<W: ?Sized + io::Write>(&mut self, w: &mut W, value: &str) -> io::Result<()> {
        let is_float = value.contains(['.', 'e', 'E']);
        match value.parse::<f64>() {
            Ok(f) if is_float && f.is_finite() => w.write_all(python_float_repr(f).as_bytes()),
            _ => w.write_all(value.as_bytes()),
        }
    }

    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        // serde_json has already escaped `"`, `\` and the C0 controls. Python escapes every
        // character outside ' '..='~' (`ESCAPE_ASCII`): that leaves DEL (0x7f) and non-ASCII to us.
        // (`is_ascii` checks a word at a time and `contains` of a byte is a memchr: this is
        // the common case, and was a tenth of the cost of sending a task when done byte by byte.)
        if fragment.is_ascii() && !fragment.as_bytes().contains(&0x7f) {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for ch in fragment.chars() {
            if ch.is_ascii() && ch != '\u{7f}' {
                w.write_all(&[ch as u8])?;
            } else {
                for unit in ch.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// Python's `repr(float)`: shortest round-trip digits, scientific below 1e-4 and from 1e16.
pub fn python_float_repr(value: f64) -> String {
    if value.is_nan() {
        return "NaN".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity".to_owned() } else { "-Infinity".to_owned() };
    }
    if value == 0.0 {
        return if value.is_sign_negative() { "-0.0".to_owned() } else { "0.0".to_owned() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "1.2345e-5".
    let sci = format!("{value:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat(point.unsigned_abs() as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{exp_sign}{:02}", exp.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_match_python_repr() {
        let cases = [
            (0.1, "0.1"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (1.0, "1.0"),
            (123456.789, "123456.789"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
            (-0.0, "-0.0"),
        ];
        for (value, expected) in cases {
            assert_eq!(python_float_repr(value), expected, "repr of {value}");
        }
    }

    #[test]
    fn separators_and_ascii_escapes_match_python() {
        let value = json!({"a": [1, 2.5, null, true], "t": "caf\u{e9} \u{1F600} \"q\"\n\u{0}\u{7f}~"});
        let text = to_string(&value).unwrap();
        assert_eq!(text, r#"{"a": [1, 2.5, null, true], "t": "caf\u00e9 \ud83d\ude00 \"q\"\n\u0000\u007f~"}"#);
    }
}
