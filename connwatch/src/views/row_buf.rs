//! A line built in a stack buffer with integer arithmetic, for `trace`'s human rows:
//! at 100,000 rows a second, `core::fmt`'s padding (a `write_char` per pad byte), its
//! per-octet address formatting, RFC 3339 timestamps and float formatting were most of
//! `trace`'s CPU. Output is byte for byte what the `format!` widths gave.
//!
//! The buffer starts filled with spaces, so padding only moves the end; digits are
//! written byte by byte (two at a time from a table) rather than copied in small
//! slices: at 230,000 rows a second the `memcpy`/`memset` calls for pieces of one to
//! six bytes were a fifth of `trace`'s CPU.
use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
};

/// Longer than any row: 15 + 8 + 17 + 2 × 27 (IPv6 addresses and ports can be up to
/// 47 bytes and push the rest right) + ... stays well under this.
const CAP: usize = 320;

pub struct RowBuf {
    buf: [u8; CAP],
    len: usize,
}

impl Default for RowBuf {
    fn default() -> Self {
        Self::new()
    }
}

/// "00" to "99": two digits per lookup.
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

impl RowBuf {
    pub fn new() -> Self {
        Self {
            // Spaces: what is skipped by `spaces` is already written.
            buf: [b' '; CAP],
            len: 0,
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    /// `n` (< 100) as two digits.
    fn pair(&mut self, n: u64) {
        let i = (n % 100) as usize * 2;
        if let Some(&[hi, lo]) = PAIRS.get(i..i + 2) {
            self.byte(hi);
            self.byte(lo);
        }
    }

    /// `n` (< 1000) without leading zeros.
    fn small(&mut self, n: u8) {
        if n >= 100 {
            self.byte(b'0' + n / 100);
            self.pair(u64::from(n % 100));
        } else if n >= 10 {
            self.pair(u64::from(n));
        } else {
            self.byte(b'0' + n);
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// Appends `bytes`, cut at the capacity (never reached by a row: see `CAP`).
    pub fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(CAP - self.len);
        if let (Some(dst), Some(src)) = (self.buf.get_mut(self.len..self.len + n), bytes.get(..n)) {
            dst.copy_from_slice(src);
            self.len += n;
        }
    }

    /// `n` spaces: the buffer beyond `len` holds spaces already.
    pub fn spaces(&mut self, n: usize) {
        self.len += n.min(CAP - self.len);
    }

    /// `s` left-aligned in `width` columns (`{:<width}`: never cut).
    pub fn left(&mut self, s: &[u8], width: usize) {
        self.push(s);
        self.spaces(width.saturating_sub(s.len()));
    }

    /// `s` right-aligned in `width` columns (`{:>width}`).
    pub fn right(&mut self, s: &[u8], width: usize) {
        self.spaces(width.saturating_sub(s.len()));
        self.push(s);
    }

    /// What `push` writes appended, then padded to `width` from where it started.
    fn left_with(&mut self, width: usize, f: impl FnOnce(&mut Self)) {
        let start = self.len;
        f(self);
        self.spaces(width.saturating_sub(self.len - start));
    }

    pub fn uint(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    /// `addr` as `Display` writes it (`1.2.3.4:80`, `[::1]:80`), left-aligned in `width`.
    pub fn socket_addr(&mut self, addr: &SocketAddr, width: usize) {
        self.left_with(width, |b| match addr.ip() {
            IpAddr::V4(ip) => {
                let [o0, o1, o2, o3] = ip.octets();
                b.small(o0);
                for octet in [o1, o2, o3] {
                    b.byte(b'.');
                    b.small(octet);
                }
                b.byte(b':');
                b.uint(u64::from(addr.port()));
            }
            // Rarer, and its compression rules are std's to get right.
            IpAddr::V6(_) => {
                let mut tmp = [0u8; 64];
                let mut cursor = std::io::Cursor::new(&mut tmp[..]);
                let _ = write!(cursor, "{addr}");
                let n = cursor.position() as usize;
                b.push(tmp.get(..n).unwrap_or_default());
            }
        });
    }

    /// UTC time of day with microseconds (`16:40:00.123456`), as in RFC 3339, of a time
    /// given in nanoseconds since the Unix epoch.
    pub fn time_of_day_ns(&mut self, unix_ns: u64) {
        let secs = unix_ns / 1_000_000_000 % 86_400;
        let micros = unix_ns % 1_000_000_000 / 1000;
        self.pair(secs / 3600);
        self.byte(b':');
        self.pair(secs / 60 % 60);
        self.byte(b':');
        self.pair(secs % 60);
        self.byte(b'.');
        self.pair(micros / 10_000);
        self.pair(micros / 100 % 100);
        self.pair(micros % 100);
    }

    /// Nanoseconds as milliseconds with three decimals (`1000.000`), right-aligned in
    /// `width`: `{:>width$.3}` of `ns / 1e6`, rounded half up at the microsecond.
    pub fn millis(&mut self, ns: u64, width: usize) {
        let us = ns.saturating_add(500) / 1000;
        let mut digits = itoa::Buffer::new();
        let whole = digits.format(us / 1000).as_bytes();
        self.spaces(width.saturating_sub(whole.len() + 4));
        self.push(whole);
        self.byte(b'.');
        let frac = us % 1000;
        self.byte(b'0' + (frac / 100) as u8);
        self.pair(frac % 100);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn text(b: &RowBuf) -> &str {
        std::str::from_utf8(b.as_bytes()).unwrap()
    }

    #[test]
    fn addresses_match_display() {
        for a in [
            "127.0.0.1:80",
            "10.200.3.4:65535",
            "1.22.255.9:7",
            "100.99.10.0:443",
            "0.0.0.0:0",
            "[::1]:8080",
            "[2001:db8::1]:443",
            "[::ffff:10.1.2.3]:1",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            let mut b = RowBuf::new();
            b.socket_addr(&addr, 26);
            assert_eq!(text(&b), format!("{addr:<26}"), "{a}");
        }
    }

    #[test]
    fn time_of_day_matches_rfc3339() {
        for secs in [0u64, 59, 3_600, 86_399, 1_764_693_600, 1_764_780_000] {
            for micros in [0u32, 1, 999_999, 123_456] {
                let t = UNIX_EPOCH + Duration::new(secs, micros * 1000 + 789);
                let mut b = RowBuf::new();
                b.time_of_day_ns(secs * 1_000_000_000 + u64::from(micros) * 1000 + 789);
                let full = humantime::format_rfc3339_micros(t).to_string();
                assert_eq!(text(&b), &full[11..26], "{full}");
            }
        }
    }

    #[test]
    fn millis_match_float_formatting_off_ties() {
        for ns in [
            0u64,
            1,
            499,
            1_234_567,
            999_999_999,
            60_000_000_000,
            12_345_678_901_234,
        ] {
            let mut b = RowBuf::new();
            b.millis(ns, 10);
            assert_eq!(text(&b), format!("{:>10.3}", ns as f64 / 1e6), "{ns}");
        }
    }

    #[test]
    fn padding_never_cuts() {
        let mut b = RowBuf::new();
        b.left(b"a-very-long-command", 16);
        b.right(b"7", 3);
        assert_eq!(text(&b), "a-very-long-command  7");
    }
}
