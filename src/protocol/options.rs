//! The `options` startup parameter: command-line switches for the backend, as libpq sends
//! them from `PGOPTIONS` or a connection string's `options=`.
//!
//! PostgreSQL splits the string on unescaped white space (a backslash keeps the next character
//! as it is) and reads each switch as its command line would. A pooler can honour the switches
//! that set a run-time parameter, `-c name=value` (also `-cname=value`) and `--name=value`;
//! any other switch is refused, as PgBouncer does. Dashes in a name mean underscores, as in
//! PostgreSQL.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionsError {
    #[error("unsupported options startup parameter: only '-c name=value' and '--name=value' are supported, got \"{0}\"")]
    UnsupportedSwitch(String),
    #[error("invalid options startup parameter: \"{0}\" requires a value")]
    MissingValue(String),
    #[error("invalid options startup parameter: \"{0}\" is not a valid parameter name")]
    BadName(String),
}

/// The `(name, value)` settings an `options` string asks for, in order.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, OptionsError> {
    let words = split_words(options);
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words.next().ok_or_else(|| OptionsError::MissingValue(word.clone()))?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(OptionsError::UnsupportedSwitch(word));
        };
        let Some((name, value)) = assignment.split_once('=') else {
            return Err(OptionsError::MissingValue(assignment));
        };
        let name = name.replace('-', "_");
        if !is_parameter_name(&name) {
            return Err(OptionsError::BadName(name));
        }
        settings.push((name, value.to_string()));
    }
    Ok(settings)
}

/// A run-time parameter's name: an identifier, with dots for extensions' own (`plan.x`).
pub fn is_parameter_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// PostgreSQL's pg_split_opts: white space separates, a backslash escapes the next character.
fn split_words(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                in_word = true;
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn every_spelling_of_a_setting() {
        let parsed = parse_options("-c search_path=app  -cstatement_timeout=5s --work-mem=8MB\t-c x.y=1");
        assert_eq!(
            parsed.unwrap(),
            pairs(&[("search_path", "app"), ("statement_timeout", "5s"), ("work_mem", "8MB"), ("x.y", "1")])
        );
        assert_eq!(parse_options("").unwrap(), vec![]);
        assert_eq!(parse_options("   ").unwrap(), vec![]);
    }

    #[test]
    fn backslash_keeps_spaces_and_itself() {
        let parsed = parse_options(r"-c search_path=a,\ b -c application_name=x\\y").unwrap();
        assert_eq!(parsed, pairs(&[("search_path", "a, b"), ("application_name", r"x\y")]));
        assert_eq!(parse_options(r"-c datestyle=ISO,\ DMY").unwrap(), pairs(&[("datestyle", "ISO, DMY")]));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused() {
        assert_eq!(parse_options("-B 100"), Err(OptionsError::UnsupportedSwitch("-B".into())));
        assert_eq!(parse_options("-c"), Err(OptionsError::MissingValue("-c".into())));
        assert_eq!(parse_options("-c work_mem"), Err(OptionsError::MissingValue("work_mem".into())));
        assert_eq!(parse_options("--1x=2"), Err(OptionsError::BadName("1x".into())));
        assert_eq!(parse_options("-c a;b=1"), Err(OptionsError::BadName("a;b".into())));
        assert!(parse_options("-c a=1 -c").is_err());
    }
}
