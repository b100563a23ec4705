//! Console commands, parsed from the text of a query as PgBouncer reads them: one command,
//! keywords in any case, an optional trailing semicolon, names bare or double-quoted, and
//! `SET key = value` with the value bare or single-quoted.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `SHOW <what>`, the subject in upper case (`POOLS`, `STATS_TOTALS`, ...).
    Show(String),
    Pause(Option<String>),
    Resume(Option<String>),
    Suspend,
    Disable(String),
    Enable(String),
    Reconnect(Option<String>),
    Kill(Option<String>),
    KillClient(u64),
    WaitClose(Option<String>),
    Reload,
    Shutdown(ShutdownMode),
    Set {
        key: String,
        value: String,
    },
    /// An empty query (`;`): answered with EmptyQueryResponse.
    Empty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    Now,
    WaitForServers,
    WaitForClients,
}

/// Why a query is not a console command; the message is what the client reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Command {
    /// Whether a `stats_users` member may run it (only `SHOW`).
    pub fn read_only(&self) -> bool {
        matches!(self, Command::Show(_) | Command::Empty)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
    Equals,
}

fn tokenize(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '=' {
            chars.next();
            tokens.push(Token::Equals);
        } else if c == '\'' || c == '"' {
            chars.next();
            let mut value = String::new();
            loop {
                match chars.next() {
                    // A doubled quote stands for itself.
                    Some(q) if q == c && chars.peek() == Some(&c) => {
                        chars.next();
                        value.push(c);
                    }
                    Some(q) if q == c => break,
                    Some(other) => value.push(other),
                    None => return Err(ParseError("unterminated quoted string".into())),
                }
            }
            tokens.push(if c == '"' { Token::Word(value) } else { Token::Quoted(value) });
        } else {
            let mut word = String::new();
            while let Some(&w) = chars.peek() {
                if w.is_whitespace() || w == '=' || w == '\'' {
                    break;
                }
                word.push(w);
                chars.next();
            }
            tokens.push(Token::Word(word));
        }
    }
    Ok(tokens)
}

fn invalid(text: &str) -> ParseError {
    ParseError(format!("invalid command '{}', use SHOW HELP;", text.trim()))
}

pub fn parse(text: &str) -> Result<Command, ParseError> {
    let trimmed = text.trim().trim_end_matches(';').trim_end();
    if trimmed.is_empty() {
        return Ok(Command::Empty);
    }
    let tokens = tokenize(trimmed)?;
    let word = |t: &Token| match t {
        Token::Word(w) => Some(w.clone()),
        _ => None,
    };
    let Some(verb) = tokens.first().and_then(word).map(|w| w.to_ascii_uppercase()) else {
        return Err(invalid(text));
    };
    let args: Vec<&Token> = tokens.iter().skip(1).collect();
    let no_args = |command: Command| if args.is_empty() { Ok(command) } else { Err(invalid(text)) };
    let optional_name = || match args.as_slice() {
        [] => Ok(None),
        [Token::Word(name)] => Ok(Some(name.clone())),
        _ => Err(invalid(text)),
    };
    let name = || match args.as_slice() {
        [Token::Word(name)] => Ok(name.clone()),
        _ => Err(invalid(text)),
    };
    match verb.as_str() {
        "SHOW" => match args.as_slice() {
            [Token::Word(what)] => Ok(Command::Show(what.to_ascii_uppercase())),
            _ => Err(invalid(text)),
        },
        "PAUSE" => Ok(Command::Pause(optional_name()?)),
        "RESUME" => Ok(Command::Resume(optional_name()?)),
        "SUSPEND" => no_args(Command::Suspend),
        "DISABLE" => Ok(Command::Disable(name()?)),
        "ENABLE" => Ok(Command::Enable(name()?)),
        "RECONNECT" => Ok(Command::Reconnect(optional_name()?)),
        "KILL" => Ok(Command::Kill(optional_name()?)),
        "KILL_CLIENT" => {
            let id = name()?;
            id.parse().map(Command::KillClient).map_err(|_| ParseError(format!("invalid client id: {id}")))
        }
        "WAIT_CLOSE" => Ok(Command::WaitClose(optional_name()?)),
        "RELOAD" => no_args(Command::Reload),
        "SHUTDOWN" => match args.as_slice() {
            [] => Ok(Command::Shutdown(ShutdownMode::Now)),
            [Token::Word(mode)] if mode.eq_ignore_ascii_case("WAIT_FOR_SERVERS") => {
                Ok(Command::Shutdown(ShutdownMode::WaitForServers))
            }
            [Token::Word(mode)] if mode.eq_ignore_ascii_case("WAIT_FOR_CLIENTS") => {
                Ok(Command::Shutdown(ShutdownMode::WaitForClients))
            }
            _ => Err(invalid(text)),
        },
        "SET" => match args.as_slice() {
            [Token::Word(key), Token::Equals, Token::Word(value) | Token::Quoted(value)] => {
                Ok(Command::Set { key: key.to_ascii_lowercase(), value: value.clone() })
            }
            // `SET key TO value`, as PostgreSQL also allows.
            [Token::Word(key), Token::Word(to), Token::Word(value) | Token::Quoted(value)]
                if to.eq_ignore_ascii_case("TO") =>
            {
                Ok(Command::Set { key: key.to_ascii_lowercase(), value: value.clone() })
            }
            _ => Err(invalid(text)),
        },
        _ => Err(invalid(text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_in_any_case_with_or_without_semicolon() {
        assert_eq!(parse("SHOW POOLS;"), Ok(Command::Show("POOLS".into())));
        assert_eq!(parse("  show stats_totals  "), Ok(Command::Show("STATS_TOTALS".into())));
        assert_eq!(parse(";"), Ok(Command::Empty));
        assert!(parse("SHOW").is_err());
        assert!(parse("SHOW POOLS extra").is_err());
    }

    #[test]
    fn control_commands_and_their_arguments() {
        assert_eq!(parse("pause"), Ok(Command::Pause(None)));
        assert_eq!(parse("PAUSE app"), Ok(Command::Pause(Some("app".into()))));
        assert_eq!(parse("RESUME \"My Db\";"), Ok(Command::Resume(Some("My Db".into()))));
        assert_eq!(parse("KILL_CLIENT 42"), Ok(Command::KillClient(42)));
        assert!(parse("KILL_CLIENT abc").unwrap_err().0.contains("invalid client id"));
        assert!(parse("DISABLE").is_err(), "DISABLE needs a database");
        assert_eq!(parse("SHUTDOWN WAIT_FOR_CLIENTS"), Ok(Command::Shutdown(ShutdownMode::WaitForClients)));
        assert_eq!(parse("shutdown"), Ok(Command::Shutdown(ShutdownMode::Now)));
        assert!(parse("RELOAD now").is_err());
    }

    #[test]
    fn set_takes_bare_and_quoted_values() {
        assert_eq!(
            parse("SET default_pool_size = 30"),
            Ok(Command::Set { key: "default_pool_size".into(), value: "30".into() })
        );
        assert_eq!(
            parse("set Admin_Users='a, b'"),
            Ok(Command::Set { key: "admin_users".into(), value: "a, b".into() })
        );
        assert_eq!(parse("SET x TO 'it''s'"), Ok(Command::Set { key: "x".into(), value: "it's".into() }));
        assert!(parse("SET x 1").is_err());
        assert!(parse("SET x = 'open").is_err());
    }

    #[test]
    fn unknown_commands_name_the_way_out() {
        assert_eq!(parse("SELECT 1").unwrap_err().0, "invalid command 'SELECT 1', use SHOW HELP;");
        assert!(Command::Show("POOLS".into()).read_only());
        assert!(!Command::Pause(None).read_only());
    }
}
