//! What people see of each other: display names (nicknames, group names) and avatar URLs.
//!
//! A display name is shown to other users beside what they type, so it must not be able to
//! pass for something else: no control characters, no bidirectional formatting (U+202E
//! "RIGHT-TO-LEFT OVERRIDE" makes "gnp.exe" read as "exe.png"), and at least one character
//! that shows (not only spaces, zero-width characters or other invisible formatting).
//! An avatar is fetched by other users' browsers: `https:` only (no mixed content, no
//! `javascript:`, no credentials in the URL), normalised so that one image has one spelling.

use super::ApiError;
use im_shared::ErrorCode;

/// Bidirectional formatting characters: embeddings, overrides, isolates and marks.
fn is_bidi_control(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether `text` holds bidirectional formatting characters.
pub fn has_bidi_control(text: &str) -> bool {
    text.chars().any(is_bidi_control)
}

/// Characters that show nothing by themselves: whitespace, and the format characters and
/// fillers commonly used to make a name look empty (zero-width space and joiners, word
/// joiner, BOM, soft hyphen, Hangul fillers, variation selectors, tags).
fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{206F}'
            | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
            | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// `raw` trimmed, if it is a display name of 1 to `max_chars` characters; `what` names the
/// field in the error.
pub fn display_name<'a>(raw: &'a str, max_chars: usize, what: &str) -> Result<&'a str, ApiError> {
    let name = raw.trim();
    let n = name.chars().count();
    let bad = |why: &str| {
        Err(ApiError::bad(
            ErrorCode::InvalidField,
            format!("{what}: {why}"),
        ))
    };
    if n == 0 || n > max_chars {
        return bad(&format!("1 to {max_chars} characters"));
    }
    if name.chars().any(char::is_control) {
        return bad("no control characters");
    }
    if name.chars().any(is_bidi_control) {
        return bad("no bidirectional formatting characters (U+202A-U+202E, U+2066-U+2069, marks)");
    }
    if name.chars().all(is_invisible) {
        return bad("at least one visible character");
    }
    Ok(name)
}

/// Longest avatar URL.
pub const AVATAR_BYTES_MAX: usize = 512;

/// The normalised avatar URL, or "" for none: `https://` only, the scheme and host in lower
/// case, the default port dropped, no user name or password, no fragment, printable ASCII.
pub fn avatar_url(raw: &str) -> Result<String, ApiError> {
    let bad = || {
        Err(ApiError::bad(
            ErrorCode::InvalidField,
            "avatar: an https:// URL of at most 512 bytes (printable ASCII, no user name or password), or empty",
        ))
    };
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(String::new());
    }
    if raw.len() > AVATAR_BYTES_MAX || !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return bad();
    }
    let Some(scheme_end) = raw.find("://") else {
        return bad();
    };
    if !raw[..scheme_end].eq_ignore_ascii_case("https") {
        return bad();
    }
    let rest = &raw[scheme_end + 3..];
    // A fragment never reaches the server: it is not part of the image's address.
    let rest = rest.split('#').next().unwrap_or_default();
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') || authority.is_empty() {
        return bad();
    }
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal's colons are inside brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (authority, None),
    };
    let host_ok = !host.is_empty()
        && (host.starts_with('[') && host.ends_with(']')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    if !host_ok {
        return bad();
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(443) => None,
            Ok(0) | Err(_) => return bad(),
            Ok(n) => Some(n),
        },
    };
    let mut url = format!("https://{}", host.to_ascii_lowercase());
    if let Some(p) = port {
        url.push_str(&format!(":{p}"));
    }
    url.push_str(tail);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_refuse_what_hides_or_reorders_text() {
        assert_eq!(display_name("  Alice  ", 64, "nickname").unwrap(), "Alice");
        assert_eq!(display_name("Zoë 🦀", 64, "nickname").unwrap(), "Zoë 🦀");
        assert_eq!(display_name("علي", 64, "nickname").unwrap(), "علي");
        for bad in [
            "",
            "   ",
            "gnp\u{202E}exe.",
            "a\u{2066}b\u{2069}",
            "\u{200F}x",
            "\u{200B}\u{200B}",
            "\u{3164}",
            " \u{FEFF} \u{2060} ",
            "a\u{0007}b",
            "a\nb",
        ] {
            assert!(display_name(bad, 64, "nickname").is_err(), "{bad:?}");
        }
        assert!(display_name(&"x".repeat(65), 64, "nickname").is_err());
        assert!(display_name(&"é".repeat(64), 64, "nickname").is_ok());
    }

    #[test]
    fn avatars_are_https_and_normalised() {
        for (raw, want) in [
            ("", ""),
            ("https://example.com/a.png", "https://example.com/a.png"),
            ("HTTPS://Example.COM:443/A.png", "https://example.com/A.png"),
            (
                "https://cdn.example.com:8443/x?y=1#frag",
                "https://cdn.example.com:8443/x?y=1",
            ),
            ("https://example.com", "https://example.com/"),
            (
                "https://[2001:db8::1]:8443/a",
                "https://[2001:db8::1]:8443/a",
            ),
        ] {
            assert_eq!(avatar_url(raw).unwrap(), want, "{raw}");
        }
        for bad in [
            "http://example.com/a.png",
            "javascript:alert(1)",
            "data:image/png;base64,AAAA",
            "https://user:pw@example.com/a.png",
            "https:///a.png",
            "https://exa mple.com/",
            "https://example.com/a b.png",
            "https://exämple.com/",
            "https://example.com:0/",
            "https://example.com:99999/",
            "//example.com/a.png",
        ] {
            assert!(avatar_url(bad).is_err(), "{bad}");
        }
        assert!(avatar_url(&format!("https://e.com/{}", "a".repeat(600))).is_err());
    }
}
