//! Parser for the libpq-style `key=value` strings used as values in the
//! `[databases]`, `[users]` and `[peers]` sections.
//!
//! Accepted forms: `key=value`, spaces around `=`, and single-quoted values
//! that may contain spaces. Inside quotes `\'` and `\\` are libpq escapes and
//! `''` is PgBouncer's escape for a quote; any other backslash is kept as is,
//! so PgBouncer configs that relied on literal backslashes keep working.
//! Empty values are rejected, as PgBouncer does. Parameter names are
//! lowercased; interpreting them is the caller's job.

/// Splits `input` into `(key, value)` pairs in order of appearance.
///
/// The error is a human-readable description of what is wrong, meant to be
/// wrapped into a `ConfigError` that adds file, line and entry name.
pub(crate) fn parse(input: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }

        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if key.is_empty() {
            return Err("found '=' without a parameter name before it".to_string());
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            return Err(format!("missing '=' after parameter name \"{key}\""));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}

        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(format!("unterminated quoted value for \"{key}\" (missing closing ')"))
                    }
                    Some('\\') => match chars.next_if(|c| *c == '\'' || *c == '\\') {
                        Some(escaped) => value.push(escaped),
                        None => value.push('\\'),
                    },
                    Some('\'') => {
                        if chars.next_if_eq(&'\'').is_some() {
                            value.push('\'');
                        } else {
                            break;
                        }
                    }
                    Some(c) => value.push(c),
                }
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(format!(
                    "unexpected text right after the closing quote of \"{key}\"; \
                     separate parameters with spaces"
                ));
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        if value.is_empty() {
            return Err(format!("empty value for \"{key}\""));
        }
        pairs.push((key.to_ascii_lowercase(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn pairs(input: &str) -> Vec<(String, String)> {
        parse(input).unwrap()
    }

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn plain_pairs_and_spacing() {
        assert_eq!(
            pairs("host=postgres port=5432 dbname=mydb"),
            [p("host", "postgres"), p("port", "5432"), p("dbname", "mydb")]
        );
        assert_eq!(pairs("  host = a\tPort= 1 "), [p("host", "a"), p("port", "1")]);
        assert!(pairs("").is_empty());
        assert!(pairs("   ").is_empty());
    }

    #[test]
    fn quoted_values() {
        assert_eq!(
            pairs(r"connect_query='SELECT \'a b\', 1' user=x"),
            [p("connect_query", "SELECT 'a b', 1"), p("user", "x")]
        );
        assert_eq!(pairs("password='it''s'"), [p("password", "it's")]);
        assert_eq!(pairs(r"password='a\\b'"), [p("password", r"a\b")]);
        // Backslashes that escape nothing stay literal.
        assert_eq!(pairs(r"host='C:\tmp\x'"), [p("host", r"C:\tmp\x")]);
        // Unquoted values keep quotes and backslashes literally.
        assert_eq!(pairs(r"password=a'b\c"), [p("password", r"a'b\c")]);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            parse("host='abc").unwrap_err(),
            "unterminated quoted value for \"host\" (missing closing ')"
        );
        assert_eq!(parse("host").unwrap_err(), "missing '=' after parameter name \"host\"");
        assert_eq!(parse("=x").unwrap_err(), "found '=' without a parameter name before it");
        assert_eq!(parse("port=").unwrap_err(), "empty value for \"port\"");
        assert_eq!(parse("port=''").unwrap_err(), "empty value for \"port\"");
        assert!(parse("a='x'b=1").unwrap_err().contains("closing quote of \"a\""));
    }
}
