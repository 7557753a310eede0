//! Parsing that says where: every refusal of a TOML or JSON document carries the
//! dotted field path (`health.interval`) and, where the format has one, the line and
//! column, and never the value of a secret.

use serde::de::DeserializeOwned;
use std::fmt;

/// 1-based line and column (in characters) of a place in a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A document that could not be read as its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseProblem {
    /// Dotted path of the field at fault; `document` when the syntax is broken
    /// before any field is reached.
    pub field: String,
    pub message: String,
    pub at: Option<Position>,
}

impl ParseProblem {
    /// `name:line:column: field: message` (no position: `name: field: message`).
    pub fn in_source(&self, name: &str) -> String {
        format!(
            "{}: {}: {}",
            at_prefix(name, self.at),
            self.field,
            self.message
        )
    }
}

/// `name:line:column`, or `name` alone without a position.
pub fn at_prefix(name: &str, at: Option<Position>) -> String {
    match at {
        Some(at) => format!("{name}:{at}"),
        None => name.to_string(),
    }
}

/// The position of byte `offset` in `text`.
pub fn position(text: &str, offset: usize) -> Position {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    Position {
        line: before.matches('\n').count() + 1,
        column: before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
    }
}

/// Where the key of a dotted field (`resources.memory`, `env.FOO`) is written in a
/// TOML document; the deepest key found when the field itself is not written
/// (a missing key is blamed on its table).
pub fn locate_toml(text: &str, field: &str) -> Option<Position> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    for part in field.split('.') {
        let Some((key, item)) = table.get_key_value(part) else {
            break;
        };
        span = key.span().or_else(|| item.span());
        match item.as_table_like() {
            Some(inner) => table = inner,
            None => break,
        }
    }
    span.map(|s| position(text, s.start))
}

/// Reads `text` as TOML into `T`.
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, ParseProblem> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = field_of(e.path(), e.inner().message());
        let at = e
            .inner()
            .span()
            .map(|span| position(text, span.start))
            .or_else(|| locate_toml(text, &field));
        // `message()` is the bare reason; toml's Display would quote the source
        // line, which may hold a secret.
        let message = one_line(e.inner().message());
        ParseProblem {
            message: shown(&field, &message),
            field,
            at,
        }
    })
}

/// Reads `text` as JSON into `T`; a refusal quotes no secret.
pub fn from_json<T: DeserializeOwned>(text: &[u8]) -> Result<T, ParseProblem> {
    json(text, false)
}

/// Like `from_json`, but a refusal quotes no value at all: for documents from
/// another system, where a secret may sit under any key.
pub fn from_json_hiding_values<T: DeserializeOwned>(text: &[u8]) -> Result<T, ParseProblem> {
    json(text, true)
}

fn json<T: DeserializeOwned>(text: &[u8], hide_all: bool) -> Result<T, ParseProblem> {
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let value = result.map_err(|e| {
        let inner = e.inner();
        let at = (inner.line() > 0).then(|| Position {
            line: inner.line(),
            column: inner.column(),
        });
        let message = inner.to_string();
        // serde_json appends " at line L column C"; the position is kept apart.
        let message = match message.rsplit_once(" at line ") {
            Some((m, _)) => m.to_string(),
            None => message,
        };
        let field = field_of(e.path(), &message);
        ParseProblem {
            message: if hide_all {
                hidden(&message)
            } else {
                shown(&field, &message)
            },
            field,
            at,
        }
    })?;
    deserializer.end().map_err(|e| ParseProblem {
        field: "document".into(),
        message: "trailing characters after the document".into(),
        at: Some(Position {
            line: e.line(),
            column: e.column(),
        }),
    })?;
    Ok(value)
}

/// The dotted path serde_path_to_error tracked, with the key serde names for an
/// unknown or missing field appended (the path ends at its table).
fn field_of(path: &serde_path_to_error::Path, message: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => match parts.last_mut() {
                Some(last) => last.push_str(&format!("[{index}]")),
                None => parts.push(format!("[{index}]")),
            },
            serde_path_to_error::Segment::Map { key } => parts.push(key.clone()),
            serde_path_to_error::Segment::Enum { variant } => parts.push(variant.clone()),
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    for marker in ["missing field `", "unknown field `"] {
        if let Some(name) = message
            .split(marker)
            .nth(1)
            .and_then(|rest| rest.split('`').next())
        {
            if parts.last().map(String::as_str) != Some(name) {
                parts.push(name.to_string());
            }
        }
    }
    if parts.is_empty() {
        "document".into()
    } else {
        parts.join(".")
    }
}

fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The message as it may be shown: under a `secrets` table the offending value is
/// cut out ("invalid type: integer `483920`, expected a string" -> "invalid type:
/// integer, expected a string (the value is not shown)").
fn shown(field: &str, message: &str) -> String {
    if field
        .split('.')
        .any(|part| part == "secrets" || part.starts_with("secrets["))
    {
        hidden(message)
    } else {
        message.to_string()
    }
}

fn hidden(message: &str) -> String {
    if let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    {
        let what = if message.starts_with("invalid type") {
            "invalid type"
        } else {
            "invalid value"
        };
        let kind = rest.split([' ', ',']).next().unwrap_or("value");
        let expected = rest
            .split_once(", expected ")
            .map(|(_, x)| format!(", expected {x}"))
            .unwrap_or_default();
        return format!("{what}: {kind}{expected} (the value is not shown)");
    }
    // Unknown and missing fields are named by serde in backticks: keys, not values.
    if message.starts_with("unknown field") || message.starts_with("missing field") {
        return message.to_string();
    }
    // Any other message may quote the value; keep only its first words.
    match message.split_once(['`', '"', '\'']) {
        Some((head, _)) => format!("{} (the value is not shown)", head.trim_end()),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        let text = "a = 1\né = \"x\"\n";
        assert_eq!(position(text, 0), Position { line: 1, column: 1 });
        assert_eq!(position(text, 6), Position { line: 2, column: 1 });
        // 'é' is two bytes, one column.
        assert_eq!(position(text, 9), Position { line: 2, column: 3 });
    }

    #[test]
    fn secret_values_are_cut_from_messages() {
        let m = shown(
            "secrets.DB_PIN",
            "invalid type: integer `483920`, expected a string",
        );
        assert_eq!(
            m,
            "invalid type: integer, expected a string (the value is not shown)"
        );
        assert!(!m.contains("483920"));
        let other = "invalid type: integer `483920`, expected a string";
        assert_eq!(shown("env.PORT", other), other);
    }
}

/// One refusal per message kind, as the operator sees it.
#[cfg(test)]
mod refusals {
    use crate::spec::DepartmentSpec;
    use crate::Config;
    use std::path::Path;

    fn spec_refusal(text: &str) -> String {
        let err = DepartmentSpec::from_toml("hr.toml", text).expect_err("must be refused");
        err.in_file("hr.toml", text)
            .iter()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn config_refusal(text: &str) -> String {
        Config::from_toml_str(Path::new("/etc/fleet-agent/agent.toml"), text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn spec_bad_duration_names_field_line_and_column() {
        let m = spec_refusal("id = \"hr\"\nimage = \"a\"\n[health]\ninterval = \"soon\"\n");
        assert!(m.starts_with("hr.toml:4:12: health.interval: "), "{m}");
        assert!(m.contains("soon"), "{m}");
    }

    #[test]
    fn spec_syntax_error_has_line_and_column() {
        let m = spec_refusal("id = \"hr\"\nimage = [unclosed\n");
        assert!(m.starts_with("hr.toml:2:"), "{m}");
        assert!(m.contains("invalid array"), "{m}");
        assert!(!m.contains('\n'), "one line: {m}");
    }

    #[test]
    fn spec_unknown_key_names_the_dotted_key() {
        let m = spec_refusal("id = \"hr\"\nimage = \"a\"\n[health]\nintervall = \"5s\"\n");
        assert!(
            m.starts_with("hr.toml:4:1: health.intervall: unknown field"),
            "{m}"
        );
    }

    #[test]
    fn spec_missing_key_is_named() {
        let m = spec_refusal("id = \"hr\"\n");
        assert!(m.contains(": image: missing field `image`"), "{m}");
    }

    #[test]
    fn spec_secret_type_error_never_shows_the_value() {
        let text = "id = \"hr\"\nimage = \"a\"\n[secrets]\nDB_PIN = 483920\n";
        let m = spec_refusal(text);
        assert!(
            m.starts_with("hr.toml:4:10: secrets.DB_PIN: invalid type: integer"),
            "{m}"
        );
        assert!(!m.contains("483920"), "{m}");
        let err = DepartmentSpec::from_toml("hr.toml", text).unwrap_err();
        assert!(!err.to_string().contains("483920"), "{err}");
        assert!(!format!("{err:?}").contains("483920"), "{err:?}");
        // A syntax error on a secret's line must not quote the line either.
        let broken = "id = \"hr\"\nimage = \"a\"\n[secrets]\nDB_PIN = 4839x20\n";
        let err = DepartmentSpec::from_toml("hr.toml", broken).unwrap_err();
        assert!(!err.to_string().contains("4839x20"), "{err}");
        assert!(err.to_string().starts_with("hr.toml:4:"), "{err}");
    }

    #[test]
    fn spec_validation_problems_point_at_their_key() {
        let m = spec_refusal("id = \"hr\"\nimage = \"a\"\n[health]\ninterval = \"1ms\"\n");
        assert_eq!(m, "hr.toml:4:1: health.interval: must be at least 100ms");
    }

    #[test]
    fn json_spec_refusal_names_the_path_and_hides_secrets() {
        let body =
            r#"{"id":"hr","image":"a","secrets":{"DB_PIN":483920},"health":{"interval":"soon"}}"#;
        let err = DepartmentSpec::from_json("body", body).unwrap_err();
        let shown = err.to_string();
        assert!(shown.starts_with("body:1:"), "{shown}");
        assert!(
            shown.contains("secrets.DB_PIN: invalid type: integer"),
            "{shown}"
        );
        assert!(!shown.contains("483920"), "{shown}");
        let fields = err.fields();
        assert_eq!(fields[0].field, "secrets.DB_PIN");
        assert!(!fields[0].message.contains("483920"));
        let body = r#"{"id":"hr","image":"a","health":{"interval":"soon"}}"#;
        let err = DepartmentSpec::from_json("body", body).unwrap_err();
        assert_eq!(err.fields()[0].field, "health.interval");
    }

    #[test]
    fn coordinator_document_refusal_names_the_department_path() {
        let body = r#"{"revision":3,"departments":[{"id":"hr","image":"a"},{"id":"it","image":"b","secrets":{"K":7}}]}"#;
        let problem = super::from_json::<crate::api::DesiredState>(body.as_bytes()).unwrap_err();
        assert_eq!(problem.field, "departments[1].secrets.K");
        assert!(!problem.message.contains('7'), "{}", problem.message);
    }

    #[test]
    fn config_bad_duration_names_field_line_and_column() {
        let m = config_refusal("[docker]\npull_timeout = \"soon\"\n");
        assert!(
            m.starts_with("/etc/fleet-agent/agent.toml:2:16: docker.pull_timeout: "),
            "{m}"
        );
    }

    #[test]
    fn config_syntax_error_has_line_and_column() {
        let m = config_refusal("log_level = \"info\"\n[api\n");
        assert!(m.starts_with("/etc/fleet-agent/agent.toml:2:"), "{m}");
        assert!(!m.contains('\n'), "{m}");
    }

    #[test]
    fn config_unknown_key_names_the_dotted_key() {
        let m = config_refusal("[api]\nlisten = \"127.0.0.1:7070\"\nmax_conections = 5\n");
        assert!(
            m.starts_with("/etc/fleet-agent/agent.toml:3:1: api.max_conections: unknown field"),
            "{m}"
        );
    }

    #[test]
    fn config_validation_problems_point_at_their_key() {
        let m = config_refusal("max_departments = 0\n");
        assert_eq!(
            m,
            "/etc/fleet-agent/agent.toml:1:1: max_departments: must be 1-1000"
        );
    }
}
