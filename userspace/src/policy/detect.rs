//! Content detectors: personal data found by shape and checksum.
//!
//! Every built-in detector is a hand-written scanner over bytes, not a
//! regular expression: they run on every value of every masked result, so
//! they must not allocate and should touch each byte a few times at most.
//! Checksums (Luhn for cards, mod-97 for IBANs) keep ordinary numbers from
//! being taken for personal data. Custom patterns from the policy use the
//! `regex` crate, compiled once when the policy loads.

use std::net::Ipv6Addr;

/// The built-in detectors, by the name used in the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Email,
    Phone,
    Ssn,
    Card,
    Iban,
    Ip,
}

impl Builtin {
    pub const NAMES: &'static str = "email, phone, ssn, card, iban, ip";

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "email" => Builtin::Email,
            "phone" => Builtin::Phone,
            "ssn" => Builtin::Ssn,
            "card" => Builtin::Card,
            "iban" => Builtin::Iban,
            "ip" => Builtin::Ip,
            _ => return None,
        })
    }
}

/// A compiled detector.
#[derive(Debug, Clone)]
pub enum Detector {
    Builtin(Builtin),
    Regex(regex::bytes::Regex),
}

impl Detector {
    /// Calls `found(start, end)` for each match, left to right.
    pub fn each_match(&self, text: &[u8], found: &mut impl FnMut(usize, usize)) {
        let mut at = 0;
        while at < text.len() {
            let Some((start, end)) = self.next_match(text, at) else {
                return;
            };
            found(start, end);
            at = end.max(start + 1);
        }
    }

    /// Whether a value with these `stats` can contain a match at all: a
    /// cheap filter that spares most values most detectors (an email
    /// address has an `@`, a card number at least 13 digits, ...).
    pub fn may_match(&self, stats: &Stats) -> bool {
        match self {
            Detector::Regex(_) => true,
            Detector::Builtin(b) => match b {
                Builtin::Email => stats.at > 0,
                Builtin::Phone => stats.digits >= 8,
                Builtin::Ssn => stats.digits >= 9,
                Builtin::Card => stats.digits >= 13,
                Builtin::Iban => stats.digits >= 2 && stats.upper >= 2,
                Builtin::Ip => stats.dots >= 3 || stats.colons >= 2,
            },
        }
    }

    fn next_match(&self, text: &[u8], from: usize) -> Option<(usize, usize)> {
        match self {
            Detector::Regex(re) => re.find_at(text, from).map(|m| (m.start(), m.end())),
            Detector::Builtin(Builtin::Email) => {
                // Found from its `@`; the local part may begin before
                // `from` (then it is not a new match).
                let mut i = from;
                while let Some(p) = text[i..].iter().position(|&c| c == b'@') {
                    let at = i + p;
                    if let Some(found) = email_at(text, at) {
                        if found.0 >= from {
                            return Some(found);
                        }
                    }
                    i = at + 1;
                }
                None
            }
            Detector::Builtin(Builtin::Phone) => word_starts(text, from, phone_at, |c| {
                c == b'+' || c == b'(' || c.is_ascii_digit()
            }),
            Detector::Builtin(Builtin::Ssn) => {
                word_starts(text, from, ssn_at, |c| c.is_ascii_digit())
            }
            Detector::Builtin(Builtin::Card) => {
                word_starts(text, from, card_at, |c| c.is_ascii_digit())
            }
            Detector::Builtin(Builtin::Iban) => {
                word_starts(text, from, iban_at, |c| c.is_ascii_uppercase())
            }
            Detector::Builtin(Builtin::Ip) => {
                let mut i = from;
                while i < text.len() {
                    let c = text[i];
                    let candidate = (c.is_ascii_hexdigit() || c == b':')
                        && (i == 0 || !(is_word(text[i - 1]) || b":.".contains(&text[i - 1])));
                    if candidate {
                        if let Some(found) = ip_at(text, i) {
                            return Some(found);
                        }
                    }
                    i += 1;
                }
                None
            }
        }
    }
}

/// A scanner: the match starting at (or found from) a position.
type Scan = fn(&[u8], usize) -> Option<(usize, usize)>;

/// The first match of `scan` at a position from `from` on where `trigger`
/// holds and a word begins (no letter, digit or `_` before it). Inside a
/// word no position can begin one, so a failed candidate skips the rest of
/// its word.
#[inline(always)]
fn word_starts(
    text: &[u8],
    from: usize,
    scan: Scan,
    trigger: impl Fn(u8) -> bool,
) -> Option<(usize, usize)> {
    let mut i = from;
    while i < text.len() {
        let c = text[i];
        if trigger(c) && boundary_before(text, i) {
            if let Some(found) = scan(text, i) {
                return Some(found);
            }
        }
        i += 1;
        if is_word(c) {
            while i < text.len() && is_word(text[i]) {
                i += 1;
            }
        }
    }
    None
}

/// Byte counts of a value, computed once for all detectors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub digits: u32,
    pub upper: u32,
    pub dots: u32,
    pub colons: u32,
    pub at: u32,
}

/// Each byte's contribution to the five 12-bit counters packed in a u64
/// (digits, upper, dots, colons, `@`): one load and one add per byte.
const CLASS: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = if b.is_ascii_digit() {
            1
        } else if b.is_ascii_uppercase() {
            1 << 12
        } else if b == b'.' {
            1 << 24
        } else if b == b':' {
            1 << 36
        } else if b == b'@' {
            1 << 48
        } else {
            0
        };
        c += 1;
    }
    t
};

impl Stats {
    pub fn of(text: &[u8]) -> Self {
        let mut s = Stats::default();
        // 4095 bytes cannot carry a 12-bit counter into the next one.
        for chunk in text.chunks(4095) {
            let packed = chunk
                .iter()
                .fold(0u64, |acc, &c| acc + CLASS[usize::from(c)]);
            let field = |n: u32| ((packed >> (12 * n)) & 0xfff) as u32;
            s.digits += field(0);
            s.upper += field(1);
            s.dots += field(2);
            s.colons += field(3);
            s.at += field(4);
        }
        s
    }
}

/// Byte classes for the scanners, one table load instead of a chain of
/// range comparisons: ASCII letters and digits, word bytes (and `_`),
/// e-mail local-part bytes (and `._%+-`), e-mail domain bytes (and `.-`).
pub(crate) const ALNUM: u8 = 1;
const WORD: u8 = 2;
const LOCAL: u8 = 4;
const DOMAIN: u8 = 8;

pub(crate) static BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        let mut k = 0;
        if b.is_ascii_alphanumeric() {
            k |= ALNUM | WORD | LOCAL | DOMAIN;
        }
        if b == b'_' {
            k |= WORD | LOCAL;
        }
        if matches!(b, b'.' | b'%' | b'+' | b'-') {
            k |= LOCAL;
        }
        if matches!(b, b'.' | b'-') {
            k |= DOMAIN;
        }
        t[c] = k;
        c += 1;
    }
    t
};

#[inline]
fn is_word(c: u8) -> bool {
    BYTE_CLASS[usize::from(c)] & WORD != 0
}

fn boundary_before(text: &[u8], i: usize) -> bool {
    i == 0 || !is_word(text[i - 1])
}

fn boundary_after(text: &[u8], end: usize) -> bool {
    end >= text.len() || !is_word(text[end])
}

/// `local@domain.tld`, found from its `@`.
fn email_at(text: &[u8], at: usize) -> Option<(usize, usize)> {
    let local = |c: u8| BYTE_CLASS[usize::from(c)] & LOCAL != 0;
    let domain = |c: u8| BYTE_CLASS[usize::from(c)] & DOMAIN != 0;
    let mut start = at;
    while start > 0 && local(text[start - 1]) {
        start -= 1;
    }
    while start < at && text[start] == b'.' {
        start += 1;
    }
    if start == at {
        return None;
    }
    let mut end = at + 1;
    while end < text.len() && domain(text[end]) {
        end += 1;
    }
    while end > at + 1 && matches!(text[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let host = &text[at + 1..end];
    let dot = host.iter().rposition(|&c| c == b'.')?;
    let tld = &host[dot + 1..];
    (dot > 0 && tld.len() >= 2 && tld.iter().all(u8::is_ascii_alphabetic)).then_some((start, end))
}

/// A run of digits with single space or dash separators; returns the end
/// and the number of digits. Stops early once more than `max` digits.
fn digit_run(text: &[u8], start: usize, max: usize) -> (usize, usize) {
    let (mut i, mut end, mut digits) = (start, start, 0);
    while i < text.len() && digits <= max {
        let c = text[i];
        if c.is_ascii_digit() {
            digits += 1;
            i += 1;
            end = i;
        } else if (c == b' ' || c == b'-')
            && i + 1 < text.len()
            && text[i + 1].is_ascii_digit()
            && end == i
        {
            i += 1;
        } else {
            break;
        }
    }
    (end, digits)
}

/// Payment card numbers: 13 to 19 digits passing the Luhn check.
fn card_at(text: &[u8], start: usize) -> Option<(usize, usize)> {
    let (end, digits) = digit_run(text, start, 19);
    if !(13..=19).contains(&digits) || !boundary_after(text, end) {
        return None;
    }
    luhn(&text[start..end]).then_some((start, end))
}

/// The Luhn checksum over the digits of `text` (other bytes skipped).
pub fn luhn(text: &[u8]) -> bool {
    // Every second digit from the right counts doubled, digit-summed.
    const DOUBLED: [[u32; 10]; 2] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [0, 2, 4, 6, 8, 1, 3, 5, 7, 9],
    ];
    let mut sum = 0u32;
    let mut double = 0usize;
    for &c in text.iter().rev().filter(|c| c.is_ascii_digit()) {
        sum += DOUBLED[double][usize::from(c - b'0')];
        double ^= 1;
    }
    sum % 10 == 0
}

fn digits_exact(text: &[u8], at: usize, n: usize) -> bool {
    text.get(at..at + n)
        .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
}

/// US social security numbers: `ddd-dd-dddd` (or spaced), valid ranges only.
fn ssn_at(text: &[u8], start: usize) -> Option<(usize, usize)> {
    let sep = *text.get(start + 3)?;
    if !(sep == b'-' || sep == b' ')
        || !digits_exact(text, start, 3)
        || !digits_exact(text, start + 4, 2)
        || text.get(start + 6) != Some(&sep)
        || !digits_exact(text, start + 7, 4)
    {
        return None;
    }
    let end = start + 11;
    if !boundary_after(text, end) || text.get(end) == Some(&b'-') {
        return None;
    }
    let area = &text[start..start + 3];
    let valid = area != b"000"
        && area != b"666"
        && area[0] != b'9'
        && &text[start + 4..start + 6] != b"00"
        && &text[start + 7..end] != b"0000";
    valid.then_some((start, end))
}

/// Phone numbers: international (`+` and 8 to 15 digits, separators
/// allowed) or North American with separators (`(555) 123-4567`,
/// `555-123-4567`, `555.123.4567`). A bare run of digits is not a phone
/// number: it is far more often an id.
fn phone_at(text: &[u8], start: usize) -> Option<(usize, usize)> {
    if text[start] == b'+' {
        let (mut i, mut end, mut digits) = (start + 1, start + 1, 0);
        while i < text.len() && digits <= 15 {
            let c = text[i];
            if c.is_ascii_digit() {
                digits += 1;
                i += 1;
                end = i;
            } else if matches!(c, b' ' | b'-' | b'.' | b'(' | b')') && i > start + 1 {
                i += 1;
            } else {
                break;
            }
        }
        return ((8..=15).contains(&digits) && boundary_after(text, end)).then_some((start, end));
    }
    let mut i = if text[start] == b'(' {
        if !digits_exact(text, start + 1, 3) || text.get(start + 4) != Some(&b')') {
            return None;
        }
        start + 5 + usize::from(text.get(start + 5) == Some(&b' '))
    } else {
        separated_group(text, start, 3)?
    };
    i = separated_group(text, i, 3)?;
    if !digits_exact(text, i, 4) {
        return None;
    }
    let end = i + 4;
    (boundary_after(text, end) && !matches!(text.get(end), Some(b'-' | b'.')))
        .then_some((start, end))
}

/// `n` digits at `at` and a separator (`-`, `.` or a space) after them:
/// where the next group starts.
fn separated_group(text: &[u8], at: usize, n: usize) -> Option<usize> {
    (digits_exact(text, at, n) && matches!(text.get(at + n), Some(b'-' | b'.' | b' ')))
        .then_some(at + n + 1)
}

/// IBANs: country, check digits, 11 to 30 alphanumerics (optionally in
/// groups of four), passing the ISO 7064 mod-97 check.
fn iban_at(text: &[u8], start: usize) -> Option<(usize, usize)> {
    let head = text.get(start..start + 4)?;
    if !(head[0].is_ascii_uppercase()
        && head[1].is_ascii_uppercase()
        && head[2].is_ascii_digit()
        && head[3].is_ascii_digit())
    {
        return None;
    }
    // Candidate ends: after every alphanumeric, spaces allowed between
    // groups; the longest that passes the checksum wins.
    let mut ends = [0usize; 34];
    let (mut count, mut i) = (0usize, start);
    while i < text.len() && count < 34 {
        let c = text[i];
        if c.is_ascii_uppercase() || c.is_ascii_digit() {
            i += 1;
            ends[count] = i;
            count += 1;
        } else if c == b' ' && count % 4 == 0 && count > 0 && i + 1 < text.len() {
            i += 1;
        } else {
            break;
        }
    }
    (15..=count.min(34)).rev().find_map(|n| {
        let end = ends[n - 1];
        (boundary_after(text, end) && mod97(&text[start..end])).then_some((start, end))
    })
}

fn mod97(iban: &[u8]) -> bool {
    let chars = || iban.iter().copied().filter(|c| *c != b' ');
    let rotated = chars().skip(4).chain(chars().take(4));
    let mut rem = 0u32;
    for c in rotated {
        let v = if c.is_ascii_digit() {
            u32::from(c - b'0')
        } else {
            u32::from(c - b'A') + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// IPv4 dotted quads and IPv6 addresses (checked by the standard parser).
fn ip_at(text: &[u8], start: usize) -> Option<(usize, usize)> {
    ipv4_at(text, start).or_else(|| ipv6_at(text, start))
}

fn ipv4_at(text: &[u8], start: usize) -> Option<(usize, usize)> {
    let mut i = start;
    for octet in 0..4 {
        let begin = i;
        let mut value = 0u32;
        while i < text.len() && text[i].is_ascii_digit() && i - begin < 3 {
            value = value * 10 + u32::from(text[i] - b'0');
            i += 1;
        }
        if i == begin || value > 255 {
            return None;
        }
        if octet < 3 {
            if text.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    let dotted_more = text.get(i) == Some(&b'.') && text.get(i + 1).is_some_and(u8::is_ascii_digit);
    (boundary_after(text, i) && !dotted_more).then_some((start, i))
}

fn ipv6_at(text: &[u8], start: usize) -> Option<(usize, usize)> {
    let mut end = start;
    let mut colons = 0;
    while end < text.len() && end - start < 45 {
        let c = text[end];
        if c == b':' {
            colons += 1;
        } else if !(c.is_ascii_hexdigit() || c == b'.') {
            break;
        }
        end += 1;
    }
    if colons < 2 || !boundary_after(text, end) {
        return None;
    }
    let candidate = std::str::from_utf8(&text[start..end]).ok()?;
    candidate.parse::<Ipv6Addr>().ok().map(|_| (start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(d: Builtin, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        Detector::Builtin(d).each_match(text.as_bytes(), &mut |s, e| {
            out.push(text[s..e].to_string())
        });
        out
    }

    #[test]
    fn emails() {
        assert_eq!(
            found(
                Builtin::Email,
                "mail ann.lee+x@example.co.uk, or bob@ex.org."
            ),
            ["ann.lee+x@example.co.uk", "bob@ex.org"]
        );
        assert!(found(Builtin::Email, "user@localhost @ a@b.c").is_empty());
    }

    #[test]
    fn cards_need_luhn() {
        assert_eq!(
            found(
                Builtin::Card,
                "card 4111 1111 1111 1111 and 4012-8888-8888-1881"
            ),
            ["4111 1111 1111 1111", "4012-8888-8888-1881"]
        );
        // 16 digits failing Luhn: an order number, not a card.
        assert!(found(Builtin::Card, "order 4111111111111112").is_empty());
        assert!(found(Builtin::Card, "41111111111111110000000").is_empty());
        assert!(found(Builtin::Card, "x4111111111111111").is_empty());
    }

    #[test]
    fn ssns_in_valid_ranges() {
        assert_eq!(found(Builtin::Ssn, "ssn 123-45-6789."), ["123-45-6789"]);
        assert!(found(
            Builtin::Ssn,
            "000-12-3456 666-12-3456 123-00-4567 123-45-67890"
        )
        .is_empty());
    }

    #[test]
    fn phones_with_separators_only() {
        assert_eq!(
            found(
                Builtin::Phone,
                "call +44 20 7946 0958 or (555) 123-4567 or 555.123.4567"
            ),
            ["+44 20 7946 0958", "(555) 123-4567", "555.123.4567"]
        );
        assert!(found(Builtin::Phone, "id 5551234567 date 2024-01-15").is_empty());
        assert_eq!(
            found(Builtin::Phone, "(555)123-4567 and 555 123 4567"),
            ["(555)123-4567", "555 123 4567"]
        );
        for not_a_phone in [
            "555-1234-567",
            "555-123-45678",
            "555-123-4567-8",
            "(55) 123-4567",
            "555--123-4567",
        ] {
            assert!(
                found(Builtin::Phone, not_a_phone).is_empty(),
                "{not_a_phone}"
            );
        }
    }

    #[test]
    fn ibans_need_mod97() {
        assert_eq!(
            found(Builtin::Iban, "pay DE89 3704 0044 0532 0130 00 now"),
            ["DE89 3704 0044 0532 0130 00"]
        );
        assert_eq!(
            found(Builtin::Iban, "GB82WEST12345698765432"),
            ["GB82WEST12345698765432"]
        );
        assert!(found(Builtin::Iban, "GB82WEST12345698765433").is_empty());
    }

    #[test]
    fn ip_addresses() {
        assert_eq!(
            found(
                Builtin::Ip,
                "from 10.0.0.5 and 2001:db8::1, not 1.2.3 or 300.1.1.1"
            ),
            ["10.0.0.5", "2001:db8::1"]
        );
        assert_eq!(found(Builtin::Ip, "::1"), ["::1"]);
        assert_eq!(found(Builtin::Ip, "via fe80::1 ok"), ["fe80::1"]);
        assert!(found(Builtin::Ip, "at 12:30:45 version 1.2.3.4.5").is_empty());
    }

    #[test]
    fn custom_regex() {
        let d = Detector::Regex(regex::bytes::Regex::new(r"EMP-\d{5}").unwrap());
        let mut n = 0;
        d.each_match(b"EMP-12345 EMP-1 EMP-54321", &mut |_, _| n += 1);
        assert_eq!(n, 2);
    }

    #[test]
    fn stats_count_long_values_without_overflow() {
        let mut text = vec![b'7'; 10_000];
        text.extend_from_slice(b"AB..::@x");
        let s = Stats::of(&text);
        assert_eq!(
            (s.digits, s.upper, s.dots, s.colons, s.at),
            (10_000, 2, 2, 2, 1)
        );
    }

    #[test]
    fn candidates_inside_words_are_skipped_not_missed() {
        assert!(found(Builtin::Card, "ab4111111111111111").is_empty());
        assert_eq!(
            found(Builtin::Card, "ab41 4111111111111111"),
            ["4111111111111111"]
        );
        assert_eq!(
            found(Builtin::Phone, "x555-123-4567 (555) 123-4567"),
            ["(555) 123-4567"]
        );
    }
}
