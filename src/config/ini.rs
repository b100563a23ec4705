//! Line-based lexer for PgBouncer's `pgbouncer.ini` dialect.
//!
//! We lex the file ourselves instead of handing it to the `config` crate's
//! INI reader because that reader unescapes backslashes and strips quotes
//! (which corrupts connection strings, `auth_query`, passwords and Windows
//! paths), knows nothing of `%include`, and loses line numbers, which we need
//! so that every error and warning can point at `file:line`.
//!
//! What the lexer does, matching PgBouncer:
//! * `;` and `#` start a comment only at the beginning of a line; later in a
//!   line they are ordinary characters (PgBouncer's docs say so explicitly),
//!   so values are never truncated at them.
//! * Section names are case-insensitive; `[pgcorral]` is an alias of
//!   `[pgbouncer]`.
//! * `%include` continues in whatever section is current, and a section
//!   header inside the included file stays in force after it, because
//!   PgBouncer keeps one section cursor across included files.
//! * Keys in `[pgbouncer]` are case-insensitive; database, user and peer
//!   names keep their case and may be double-quoted (`""` for a literal `"`)
//!   when they contain characters other than `_0-9A-Za-z`.
//!
//! Deliberate difference: a relative `%include` path is taken relative to the
//! directory of the including file, not the process's working directory, so a
//! config tree can be moved or mounted anywhere.

use std::path::{Path, PathBuf};

use super::error::ConfigError;

/// Deepest allowed nesting of `%include` below the main file.
pub(crate) const MAX_INCLUDE_DEPTH: usize = 10;

/// The sections a PgBouncer configuration may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    PgBouncer,
    Databases,
    Users,
    Peers,
}

/// One `key = value` line, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub section: Section,
    pub key: String,
    /// Verbatim text after `=`, minus surrounding whitespace.
    pub value: String,
    pub file: String,
    pub line: usize,
}

/// Lexes the file at `path` and everything it includes, in order.
pub(crate) fn lex_file(path: &Path) -> Result<Vec<Entry>, ConfigError> {
    let text = read(path)?;
    lex_str(&text, path)
}

/// Lexes `text` as if it were the contents of `path`; includes are still
/// read from disk, relative to `path`'s directory.
pub(crate) fn lex_str(text: &str, path: &Path) -> Result<Vec<Entry>, ConfigError> {
    lex_str_with(text, path, &mut read)
}

/// Like [`lex_str`], with `%include`d files read by `read_file` instead of from disk, so the
/// fuzz harness can serve them from memory (and never open `/dev/zero`).
pub(crate) fn lex_str_with(
    text: &str,
    path: &Path,
    read_file: &mut dyn FnMut(&Path) -> Result<String, ConfigError>,
) -> Result<Vec<Entry>, ConfigError> {
    let mut lexer = Lexer { entries: Vec::new(), section: None, stack: Vec::new(), read_file };
    lexer.lex(text, path)?;
    Ok(lexer.entries)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })
}

struct Lexer<'r> {
    entries: Vec<Entry>,
    section: Option<Section>,
    /// Files currently being lexed, outermost first, to catch include cycles.
    stack: Vec<PathBuf>,
    read_file: &'r mut dyn FnMut(&Path) -> Result<String, ConfigError>,
}

impl Lexer<'_> {
    fn lex(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        // A file that does not exist yet (parse_str) still gets an identity.
        let identity = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        self.stack.push(identity);
        let file = path.display().to_string();
        let dir = path.parent().unwrap_or_else(|| Path::new(""));
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, raw) in text.lines().enumerate() {
            self.line(raw, &file, index + 1, dir)?;
        }
        self.stack.pop();
        Ok(())
    }

    fn line(&mut self, raw: &str, file: &str, line: usize, dir: &Path) -> Result<(), ConfigError> {
        let syntax = |message: String| ConfigError::Syntax { file: file.to_string(), line, message };
        let text = raw.trim();
        if text.is_empty() || text.starts_with(';') || text.starts_with('#') {
            return Ok(());
        }
        if let Some(directive) = text.strip_prefix('%') {
            return self.directive(directive, file, line, dir);
        }
        if let Some(rest) = text.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| syntax(format!("section header {text:?} is missing its closing ']'")))?;
            self.section = Some(section_named(name).ok_or_else(|| {
                syntax(format!(
                    "unknown section [{}]; expected [pgbouncer] (or [pgcorral]), \
                     [databases], [users] or [peers]",
                    name.trim()
                ))
            })?);
            return Ok(());
        }

        let (key, value) = split_key_value(text).map_err(syntax)?;
        let section = self.section.ok_or_else(|| {
            syntax(format!(
                "{key:?} appears before any [section] header; put it under [pgbouncer], \
                 [databases], [users] or [peers]"
            ))
        })?;
        let key = match section {
            Section::PgBouncer => key.to_ascii_lowercase(),
            Section::Databases | Section::Users | Section::Peers => key,
        };
        self.entries.push(Entry { section, key, value: value.to_string(), file: file.to_string(), line });
        Ok(())
    }

    fn directive(&mut self, directive: &str, file: &str, line: usize, dir: &Path) -> Result<(), ConfigError> {
        let syntax = |message: String| ConfigError::Syntax { file: file.to_string(), line, message };
        let (name, argument) = match directive.find(char::is_whitespace) {
            Some(at) => (&directive[..at], directive[at..].trim()),
            None => (directive, ""),
        };
        if !name.eq_ignore_ascii_case("include") {
            return Err(syntax(format!("unknown directive %{name}; only %include is supported")));
        }
        if argument.is_empty() {
            return Err(syntax("%include needs a file name".to_string()));
        }
        let target = dir.join(argument);
        if self.stack.len() > MAX_INCLUDE_DEPTH {
            return Err(syntax(format!(
                "%include {argument}: includes are nested more than {MAX_INCLUDE_DEPTH} deep"
            )));
        }
        let identity = target.canonicalize().unwrap_or_else(|_| target.clone());
        if self.stack.contains(&identity) {
            return Err(syntax(format!(
                "%include {argument}: include cycle ({} is already being read)",
                target.display()
            )));
        }
        log::debug!("{file}:{line}: including {}", target.display());
        let text = (self.read_file)(&target)?;
        self.lex(&text, &target)
    }
}

fn section_named(name: &str) -> Option<Section> {
    match name.trim().to_ascii_lowercase().as_str() {
        "pgbouncer" | "pgcorral" => Some(Section::PgBouncer),
        "databases" => Some(Section::Databases),
        "users" => Some(Section::Users),
        "peers" => Some(Section::Peers),
        _ => None,
    }
}

/// Splits `key = value`; the key may be a double-quoted identifier.
fn split_key_value(text: &str) -> Result<(String, &str), String> {
    let (key, rest) = if let Some(quoted) = text.strip_prefix('"') {
        let mut key = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated quoted name in {text:?}")),
                Some((at, '"')) => {
                    if quoted[at + 1..].starts_with('"') {
                        chars.next();
                        key.push('"');
                    } else {
                        break at + 1;
                    }
                }
                Some((_, c)) => key.push(c),
            }
        };
        let rest = quoted[end..].trim_start();
        let rest =
            rest.strip_prefix('=').ok_or_else(|| format!("expected '=' after the quoted name \"{key}\""))?;
        (key, rest)
    } else {
        let (key, rest) = text.split_once('=').ok_or_else(|| {
            format!("expected \"key = value\", a [section] header, a comment or %include, got {text:?}")
        })?;
        let key = key.trim();
        if key.contains(char::is_whitespace) {
            return Err(format!("name {key:?} contains whitespace; put such names in double quotes"));
        }
        (key.to_string(), rest)
    };
    if key.is_empty() {
        return Err("missing name before '='".to_string());
    }
    Ok((key, rest.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn lex(text: &str) -> Vec<Entry> {
        lex_str(text, Path::new("pgbouncer.ini")).unwrap()
    }

    fn lex_err(text: &str) -> String {
        lex_str(text, Path::new("pgbouncer.ini")).unwrap_err().to_string()
    }

    /// A fresh directory under the system temp dir, unique per call.
    fn temp_dir(tag: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgcorral-ini-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn comments_blank_lines_and_sections() {
        let entries = lex("; comment\n# other comment\n\n[PgBouncer]\nListen_Port = 6432\n\
             [databases]\nMyDb = host=x ; not a comment # either\n[Users]\nBob = pool_size=1\n");
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].section, Section::PgBouncer);
        assert_eq!(entries[0].key, "listen_port");
        assert_eq!(entries[0].line, 5);
        assert_eq!(entries[1].key, "MyDb");
        assert_eq!(entries[1].value, "host=x ; not a comment # either");
        assert_eq!(entries[2].section, Section::Users);
        assert_eq!(entries[2].key, "Bob");
        assert_eq!(entries[2].line, 9);
    }

    #[test]
    fn values_keep_backslashes_and_quotes() {
        let entries = lex("[pgbouncer]\nauth_query = SELECT 'a\\b', \"x\"  \n");
        assert_eq!(entries[0].value, "SELECT 'a\\b', \"x\"");
    }

    #[test]
    fn pgcorral_alias_and_quoted_names() {
        let entries = lex("[pgcorral]\nverbose=1\n[databases]\n\"my \"\"odd\"\" db\" = host=a\n");
        assert_eq!(entries[0].section, Section::PgBouncer);
        assert_eq!(entries[1].key, "my \"odd\" db");
        assert_eq!(entries[1].value, "host=a");
    }

    #[test]
    fn syntax_errors_have_locations() {
        assert_eq!(
            lex_err("[pgbouncer]\nlisten_port 6432\n"),
            "pgbouncer.ini:2: expected \"key = value\", a [section] header, a comment or \
             %include, got \"listen_port 6432\""
        );
        assert!(lex_err("\n[bogus]\n").starts_with("pgbouncer.ini:2: unknown section [bogus]"));
        assert!(lex_err("listen_port = 1\n").contains("before any [section]"));
        assert!(lex_err("[pgbouncer\n").contains("missing its closing ']'"));
        assert!(lex_err("[databases]\nmy db = host=a\n").contains("double quotes"));
        assert!(lex_err("[pgbouncer]\n%define x\n").contains("unknown directive %define"));
        assert!(lex_err("[pgbouncer]\n = 3\n").contains("missing name"));
    }

    #[test]
    fn include_relative_to_including_file() {
        let dir = temp_dir("include");
        std::fs::create_dir_all(dir.join("conf.d")).unwrap();
        std::fs::write(dir.join("conf.d/dbs.ini"), "[databases]\nfromincl = host=inc\n%include more.ini\n")
            .unwrap();
        std::fs::write(dir.join("conf.d/more.ini"), "deeper = host=deep\n").unwrap();
        let main = dir.join("pgbouncer.ini");
        let entries =
            lex_str("[pgbouncer]\nlisten_port = 1\n%include conf.d/dbs.ini\nafter = host=a\n", &main)
                .unwrap();
        let keys: Vec<_> = entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["listen_port", "fromincl", "deeper", "after"]);
        // The section switched inside the include stays in force afterwards.
        assert_eq!(entries[3].section, Section::Databases);
        assert!(entries[1].file.ends_with("dbs.ini"));
        assert_eq!(entries[1].line, 2);
        assert!(entries[2].file.ends_with("more.ini"));
        assert_eq!(entries[2].line, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn include_cycle_and_depth_and_missing() {
        let dir = temp_dir("cycle");
        std::fs::write(dir.join("a.ini"), "[pgbouncer]\n%include b.ini\n").unwrap();
        std::fs::write(dir.join("b.ini"), "%include a.ini\n").unwrap();
        let err = lex_file(&dir.join("a.ini")).unwrap_err().to_string();
        assert!(err.contains("b.ini:1: %include a.ini: include cycle"), "{err}");

        for i in 0..12 {
            std::fs::write(dir.join(format!("d{i}.ini")), format!("%include d{}.ini\n", i + 1)).unwrap();
        }
        std::fs::write(dir.join("d12.ini"), "").unwrap();
        let err = lex_file(&dir.join("d0.ini")).unwrap_err().to_string();
        assert!(err.contains("d10.ini:1:"), "{err}");
        assert!(err.contains("nested more than 10 deep"), "{err}");
        // Ten levels below the main file are fine.
        std::fs::write(dir.join("d10.ini"), "").unwrap();
        assert!(lex_file(&dir.join("d0.ini")).unwrap().is_empty());

        let err = lex_str("%include nope.ini\n", &dir.join("main.ini")).unwrap_err();
        assert!(matches!(err, ConfigError::Io { ref path, .. } if path.ends_with("nope.ini")));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
