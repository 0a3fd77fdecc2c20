//! Keys and values on the command line and the terminal, redis-cli's way: `--hex` keys for
//! bytes that are not text, escapes for bytes a terminal would not show.

use crate::exit::CliError;

/// A key or prefix from the command line: its UTF-8 bytes, or with `hex` its hex digits (an
/// optional `0x` first).
pub fn key_bytes(text: &str, hex: bool) -> Result<Vec<u8>, CliError> {
    if !hex {
        return Ok(text.as_bytes().to_vec());
    }
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CliError::usage(format!("--hex: {text:?} is not hex")));
    }
    if digits.len() % 2 != 0 {
        return Err(CliError::usage(format!(
            "--hex: {text:?} has an odd number of hex digits"
        )));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            digits
                .get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| CliError::usage(format!("--hex: {text:?} is not hex")))
        })
        .collect()
}

/// `bytes` for a terminal: printable characters of valid UTF-8 as they are, a backslash as
/// `\\`, anything else (control characters, NUL, bytes that are not UTF-8) as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_and_escapes() {
        assert_eq!(key_bytes("0x00ff6b", true).unwrap(), vec![0, 0xff, b'k']);
        assert_eq!(key_bytes("00ff", true).unwrap(), vec![0, 0xff]);
        assert_eq!(key_bytes("0x00ff", false).unwrap(), b"0x00ff");
        assert!(key_bytes("0xfff", true).is_err());
        assert!(key_bytes("zz", true).is_err());
        assert!(key_bytes("+f+f", true).is_err());
        let mut bytes = b"a\0b\\c\xff".to_vec();
        bytes.extend("é\n".as_bytes());
        assert_eq!(escape(&bytes), "a\\x00b\\\\c\\xffé\\x0a");
    }
}
