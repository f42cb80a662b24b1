//! A strict reader for the small subset of TOML that Vigil's config file uses.
//!
//! Supported: `key = value` lines, `[table]` and `[[array-of-tables]]` headers, `#`
//! comments, basic strings ("..." with the usual escapes), literal strings ('...'),
//! integers (with `_` separators, optional sign), booleans, and one-line arrays of those
//! scalars. Everything else (dotted keys, inline tables, floats, dates, multi-line
//! strings) is rejected with the line and column, so a config never means something
//! other than what its author thinks.
//!
//! The reader keeps every value's line so that the typed layer above it can name the
//! line of a bad value or an unknown key.

use std::fmt;

/// A scalar or array value with the line it was written on (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    String(String),
    Integer(i64),
    Boolean(bool),
    Array(Vec<Value>),
}

impl Value {
    /// The TOML type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::String(_) => "string",
            Value::Integer(_) => "integer",
            Value::Boolean(_) => "boolean",
            Value::Array(_) => "array",
        }
    }
}

/// One `key = value` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    pub line: usize,
}

/// A table: the top level, a `[name]` table or one element of a `[[name]]` array.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Empty for the top-level table.
    pub name: String,
    /// Whether the table came from a `[[name]]` header.
    pub is_array_element: bool,
    /// The header's line (0 for the top-level table).
    pub line: usize,
    pub entries: Vec<Entry>,
}

/// A parsed document: the top-level table first, then every table in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Document {
    pub tables: Vec<Table>,
}

/// A syntax error with its position (1-based line and column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for SyntaxError {}

/// Parses `text` into tables. Duplicate keys within a table and duplicate `[table]`
/// headers are errors.
pub fn parse(text: &str) -> Result<Document, SyntaxError> {
    let mut document = Document {
        tables: vec![Table::default()],
    };
    for (index, raw_line) in text.lines().enumerate() {
        let mut cursor = Cursor {
            bytes: raw_line.as_bytes(),
            text: raw_line,
            position: 0,
            line: index + 1,
        };
        cursor.skip_blank();
        if cursor.at_end_of_content() {
            continue;
        }
        if cursor.peek() == Some(b'[') {
            let table = cursor.table_header()?;
            let duplicate = !table.is_array_element
                && document
                    .tables
                    .iter()
                    .any(|t| t.name == table.name && !t.is_array_element);
            if duplicate {
                return Err(cursor.error_at(0, format!("table [{}] defined twice", table.name)));
            }
            document.tables.push(table);
            continue;
        }
        let key_column = cursor.position;
        let key = cursor.bare_or_quoted_key()?;
        cursor.skip_blank();
        cursor.expect(b'=', "'=' after the key")?;
        cursor.skip_blank();
        let value = cursor.value()?;
        cursor.skip_blank();
        if !cursor.at_end_of_content() {
            return Err(cursor.error("unexpected text after the value"));
        }
        let table = document
            .tables
            .last_mut()
            .expect("the top-level table exists");
        if table.entries.iter().any(|e| e.key == key) {
            return Err(cursor.error_at(key_column, format!("key '{key}' set twice")));
        }
        table.entries.push(Entry {
            key,
            value,
            line: index + 1,
        });
    }
    Ok(document)
}

/// Deepest array nesting accepted; the config needs one level.
const MAX_ARRAY_DEPTH: usize = 4;

struct Cursor<'a> {
    bytes: &'a [u8],
    text: &'a str,
    position: usize,
    line: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn error(&self, message: impl Into<String>) -> SyntaxError {
        self.error_at(self.position, message)
    }

    fn error_at(&self, position: usize, message: impl Into<String>) -> SyntaxError {
        // Columns count characters, not bytes, for people reading the message.
        let column = self
            .text
            .get(..position)
            .map_or(position, |s| s.chars().count())
            + 1;
        SyntaxError {
            line: self.line,
            column,
            message: message.into(),
        }
    }

    fn skip_blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r')) {
            self.position += 1;
        }
    }

    /// True at the end of the line or at a comment.
    fn at_end_of_content(&self) -> bool {
        matches!(self.peek(), None | Some(b'#'))
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<(), SyntaxError> {
        if self.peek() == Some(byte) {
            self.position += 1;
            Ok(())
        } else {
            Err(self.error(format!("expected {what}")))
        }
    }

    fn table_header(&mut self) -> Result<Table, SyntaxError> {
        let line = self.line;
        self.position += 1;
        let is_array_element = self.peek() == Some(b'[');
        if is_array_element {
            self.position += 1;
        }
        self.skip_blank();
        let name = self.bare_key()?;
        self.skip_blank();
        self.expect(b']', "']' to close the table header")?;
        if is_array_element {
            self.expect(b']', "']]' to close the array-of-tables header")?;
        }
        self.skip_blank();
        if !self.at_end_of_content() {
            return Err(self.error("unexpected text after the table header"));
        }
        Ok(Table {
            name,
            is_array_element,
            line,
            entries: Vec::new(),
        })
    }

    fn bare_or_quoted_key(&mut self) -> Result<String, SyntaxError> {
        match self.peek() {
            Some(b'"') => self.basic_string(),
            Some(b'\'') => self.literal_string(),
            _ => self.bare_key(),
        }
    }

    fn bare_key(&mut self) -> Result<String, SyntaxError> {
        let start = self.position;
        while matches!(
            self.peek(),
            Some(b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-')
        ) {
            self.position += 1;
        }
        if self.position == start {
            return Err(self.error("expected a key (letters, digits, '_' or '-')"));
        }
        if self.peek() == Some(b'.') {
            return Err(self.error("dotted keys are not supported; use a [table] header"));
        }
        Ok(self.text[start..self.position].to_string())
    }

    fn value(&mut self) -> Result<Value, SyntaxError> {
        self.value_at_depth(0)
    }

    fn value_at_depth(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        match self.peek() {
            Some(b'"') => {
                if self.bytes[self.position..].starts_with(b"\"\"\"") {
                    return Err(self.error("multi-line strings are not supported"));
                }
                Ok(Value::String(self.basic_string()?))
            }
            Some(b'\'') => {
                if self.bytes[self.position..].starts_with(b"'''") {
                    return Err(self.error("multi-line strings are not supported"));
                }
                Ok(Value::String(self.literal_string()?))
            }
            Some(b'[') => self.array(depth),
            Some(b'{') => Err(self.error("inline tables are not supported")),
            Some(b't' | b'f') => self.boolean(),
            Some(b'+' | b'-' | b'0'..=b'9') => self.integer(),
            None => Err(self.error("expected a value")),
            Some(_) => Err(self.error("expected a value: a string, integer, boolean or array")),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.error("arrays nested too deeply"));
        }
        self.position += 1;
        let mut items = Vec::new();
        loop {
            self.skip_blank();
            if self.peek() == Some(b']') {
                self.position += 1;
                return Ok(Value::Array(items));
            }
            items.push(self.value_at_depth(depth + 1)?);
            self.skip_blank();
            match self.peek() {
                Some(b',') => self.position += 1,
                Some(b']') => {}
                _ => {
                    return Err(self
                        .error("expected ',' or ']' in the array (arrays must fit on one line)"))
                }
            }
        }
    }

    fn boolean(&mut self) -> Result<Value, SyntaxError> {
        for (word, value) in [("true", true), ("false", false)] {
            if self.bytes[self.position..].starts_with(word.as_bytes()) {
                self.position += word.len();
                return Ok(Value::Boolean(value));
            }
        }
        Err(self.error("expected true or false"))
    }

    fn integer(&mut self) -> Result<Value, SyntaxError> {
        let start = self.position;
        if matches!(self.peek(), Some(b'+' | b'-')) {
            self.position += 1;
        }
        let digits_start = self.position;
        while matches!(self.peek(), Some(b'0'..=b'9' | b'_')) {
            self.position += 1;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(self.error("floating-point numbers are not supported"));
        }
        if matches!(self.peek(), Some(b'x' | b'o' | b'b' | b':' | b'T')) {
            return Err(self.error("only decimal integers are supported"));
        }
        let digits = &self.text[digits_start..self.position];
        let well_formed = !digits.is_empty()
            && !digits.starts_with('_')
            && !digits.ends_with('_')
            && !digits.contains("__")
            && (digits.len() == 1 || !digits.starts_with('0'));
        if !well_formed {
            return Err(self.error_at(
                start,
                format!("malformed integer '{}'", &self.text[start..self.position]),
            ));
        }
        let cleaned: String = self.text[start..self.position]
            .chars()
            .filter(|&c| c != '_')
            .collect();
        cleaned
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| self.error_at(start, "integer out of range"))
    }

    fn literal_string(&mut self) -> Result<String, SyntaxError> {
        let start = self.position;
        self.position += 1;
        let content_start = self.position;
        while let Some(byte) = self.peek() {
            if byte == b'\'' {
                let content = self.text[content_start..self.position].to_string();
                self.position += 1;
                return Ok(content);
            }
            self.position += 1;
        }
        Err(self.error_at(start, "unterminated string"))
    }

    fn basic_string(&mut self) -> Result<String, SyntaxError> {
        let start = self.position;
        self.position += 1;
        let mut out = String::new();
        loop {
            let rest = &self.text[self.position..];
            let Some(c) = rest.chars().next() else {
                return Err(self.error_at(start, "unterminated string"));
            };
            match c {
                '"' => {
                    self.position += 1;
                    return Ok(out);
                }
                '\\' => {
                    let escape_at = self.position;
                    self.position += 1;
                    let Some(e) = self.text[self.position..].chars().next() else {
                        return Err(self.error_at(start, "unterminated string"));
                    };
                    self.position += e.len_utf8();
                    match e {
                        '"' => out.push('"'),
                        '\\' => out.push('\\'),
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'u' | 'U' => {
                            let width = if e == 'u' { 4 } else { 8 };
                            let hex = self.text.get(self.position..self.position + width);
                            let decoded = hex
                                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .and_then(char::from_u32);
                            match decoded {
                                Some(ch) => {
                                    out.push(ch);
                                    self.position += width;
                                }
                                None => {
                                    return Err(self.error_at(escape_at, "invalid unicode escape"))
                                }
                            }
                        }
                        _ => {
                            return Err(self.error_at(escape_at, format!("unknown escape '\\{e}'")))
                        }
                    }
                }
                c if (c as u32) < 0x20 && c != '\t' => {
                    return Err(self.error("control character in a string"));
                }
                c => {
                    out.push(c);
                    self.position += c.len_utf8();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tables_arrays_and_scalars() {
        let doc = parse(
            "# comment\nnode_id = 3 # trailing\nname = \"a\\tb\"\n\n[timing]\nheartbeat_ms = 1_000\n\
             [[peers]]\nid = 1\nflags = [true, false]\n[[peers]]\nid = -2\npath = 'C:\\x'\n",
        )
        .unwrap();
        assert_eq!(doc.tables.len(), 4);
        assert_eq!(doc.tables[0].entries[0].value, Value::Integer(3));
        assert_eq!(doc.tables[0].entries[1].value, Value::String("a\tb".into()));
        assert_eq!(doc.tables[1].name, "timing");
        assert_eq!(doc.tables[1].entries[0].value, Value::Integer(1000));
        assert_eq!(doc.tables[1].entries[0].line, 6);
        assert!(doc.tables[2].is_array_element && doc.tables[3].is_array_element);
        assert_eq!(
            doc.tables[2].entries[1].value,
            Value::Array(vec![Value::Boolean(true), Value::Boolean(false)])
        );
        assert_eq!(doc.tables[3].entries[0].value, Value::Integer(-2));
        assert_eq!(
            doc.tables[3].entries[1].value,
            Value::String("C:\\x".into())
        );
    }

    #[test]
    fn rejects_what_it_does_not_support_with_position() {
        let cases: &[(&str, usize, &str)] = &[
            ("a = 1.5", 1, "floating-point"),
            ("\n\na.b = 1", 3, "dotted keys"),
            ("a = {x = 1}", 1, "inline tables"),
            ("a = \"open", 1, "unterminated"),
            ("a = 1\na = 2", 2, "set twice"),
            ("[t]\n[t]", 2, "defined twice"),
            ("a = 0x10", 1, "decimal"),
            ("a = 01", 1, "malformed integer"),
            ("a = 99999999999999999999", 1, "out of range"),
            ("a = \"\\q\"", 1, "unknown escape"),
            ("a = 1 2", 1, "unexpected text"),
            ("a", 1, "expected '='"),
            ("a = [1, 2", 1, "expected ',' or ']'"),
            ("a = [[[[[1]]]]]", 1, "nested too deeply"),
            ("[t", 1, "']'"),
            ("a = \"\"\"x\"\"\"", 1, "multi-line"),
            ("a = \"\\u12\"", 1, "unicode escape"),
            ("a = \"\\uD800\"", 1, "unicode escape"),
        ];
        for (text, line, needle) in cases {
            let error = parse(text).expect_err(text);
            assert_eq!(error.line, *line, "{text}: {error}");
            assert!(error.message.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz: random printable-ish lines from a seeded generator.
        let alphabet = b"ab=[]\"'\\#.,{}01_-+ \tu\nxtrue";
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..(state % 40) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push(alphabet[(state % alphabet.len() as u64) as usize] as char);
            }
            let _ = parse(&text);
        }
    }
}
