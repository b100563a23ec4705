//! Parser for PgBouncer's `auth_file` (`userlist.txt`).
//!
//! Each meaningful line is `"user" "secret"`, where the secret is a plain
//! password, an `md5...` hash or a `SCRAM-SHA-256$...` verifier, and `""`
//! inside quotes stands for one literal `"`. Blank lines and lines starting
//! with `;` or `#` are ignored. PgBouncer ignores whatever follows the second
//! field (some generators append extra columns), so we do too, as long as it
//! is separated by whitespace. Anything else is an error pointing at the
//! line, because silently skipping a broken line would lock that user out
//! with no clue why. A user listed twice keeps the last secret, as in
//! PgBouncer.

use std::path::Path;

use super::error::ConfigError;

/// Reads and parses the auth file at `path`.
pub(crate) fn load(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses auth file contents; `file` is only used in error messages.
pub(crate) fn parse(text: &str, file: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut users: Vec<(String, String)> = Vec::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let (user, secret) = parse_line(line).map_err(|message| ConfigError::Syntax {
            file: file.to_string(),
            line: index + 1,
            message,
        })?;
        match users.iter_mut().find(|(name, _)| *name == user) {
            Some(existing) => existing.1 = secret,
            None => users.push((user, secret)),
        }
    }
    Ok(users)
}

fn parse_line(line: &str) -> Result<(String, String), String> {
    const FORM: &str = "expected a line of the form \"user\" \"secret\"";
    let (user, rest) =
        quoted(line).ok_or_else(|| format!("{FORM}; the user name is not a complete \"quoted\" field"))?;
    let after_user = rest.trim_start();
    if after_user.len() == rest.len() && !rest.is_empty() {
        return Err(format!("{FORM}; missing space after the user name"));
    }
    if after_user.is_empty() {
        return Err(format!("{FORM}; the secret for \"{user}\" is missing"));
    }
    let (secret, rest) = quoted(after_user)
        .ok_or_else(|| format!("{FORM}; the secret for \"{user}\" is not a complete \"quoted\" field"))?;
    if rest.starts_with(|c: char| !c.is_whitespace()) {
        return Err(format!("{FORM}; unexpected text right after the secret for \"{user}\""));
    }
    Ok((user, secret))
}

/// Reads one `"..."` field at the start of `s`, returning it unescaped and
/// the text after its closing quote.
fn quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((at, c)) = chars.next() {
        if c != '"' {
            out.push(c);
        } else if body[at + 1..].starts_with('"') {
            chars.next();
            out.push('"');
        } else {
            return Some((out, &body[at + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVka2V5:c2VydmVya2V5";

    #[test]
    fn parses_plain_md5_scram_and_escapes() {
        let text = format!(
            "; generated\n\n# also a comment\n\"alice\" \"secret\"\n\
             \"admin\" \"md545f2603610af569b6155c45067268c6b\"\n\
             \"scram_user\" \"{SCRAM}\"\n\
             \"we\"\"ird\" \"pa\"\"ss word\" extra \"columns\"\n\
             \"empty\" \"\"\n  \"indented\"\t\"x\"  \n"
        );
        let users = parse(&text, "userlist.txt").unwrap();
        let expect = |u: &str, s: &str| (u.to_string(), s.to_string());
        assert_eq!(
            users,
            [
                expect("alice", "secret"),
                expect("admin", "md545f2603610af569b6155c45067268c6b"),
                expect("scram_user", SCRAM),
                expect("we\"ird", "pa\"ss word"),
                expect("empty", ""),
                expect("indented", "x"),
            ]
        );
    }

    #[test]
    fn last_duplicate_wins() {
        let users = parse("\"a\" \"1\"\n\"b\" \"2\"\n\"a\" \"3\"\n", "u").unwrap();
        assert_eq!(users, [("a".to_string(), "3".to_string()), ("b".to_string(), "2".to_string())]);
    }

    #[test]
    fn broken_lines_are_errors_with_location() {
        let err = parse("\"ok\" \"x\"\nalice secret\n", "/etc/userlist.txt").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/userlist.txt:2: expected a line of the form \"user\" \"secret\"; \
             the user name is not a complete \"quoted\" field"
        );
        for bad in [
            "\"alice\"",
            "\"alice\" secret",
            "\"alice\" \"secret",
            "\"alice\"\"secret\"",
            "\"alice\" \"secret\"x",
            "\"unterminated",
        ] {
            let err = parse(bad, "u").unwrap_err();
            assert!(matches!(err, ConfigError::Syntax { line: 1, .. }), "{bad}: {err}");
        }
    }
}
