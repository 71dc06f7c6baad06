//! The syntax error Go's `encoding/json` Decoder reports for a request body, in its words
//! (`EOF`, `unexpected EOF`, `invalid character 'x' looking for beginning of value`, …), so
//! that the simulator's 400s read as fleetd's. Only the first value counts, as with
//! `json.NewDecoder(body).Decode(&v)`: what follows it is never read.

/// Go's error for the first value of `b`, or `None` when it is well formed.
pub(crate) fn syntax_error(b: &[u8]) -> Option<String> {
    let mut p = Parser { b, i: 0 };
    p.ws();
    if p.i >= b.len() {
        return Some("EOF".into());
    }
    p.value().err()
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

type Step = Result<(), String>;

/// `invalid character 'c' WHAT`, with the character quoted as Go's `quoteChar` does.
fn invalid(c: u8, what: &str) -> String {
    let q = match c {
        b'\'' => "\\'".to_string(),
        b'"' => "\"".to_string(),
        b'\\' => "\\\\".to_string(),
        0x07 => "\\a".into(),
        0x08 => "\\b".into(),
        0x0c => "\\f".into(),
        b'\n' => "\\n".into(),
        b'\r' => "\\r".into(),
        b'\t' => "\\t".into(),
        0x0b => "\\v".into(),
        c if c < 0x20 || c == 0x7f => format!("\\x{c:02x}"),
        c if c < 0x80 => (c as char).to_string(),
        // A byte is quoted as the rune of the same value.
        c if c < 0xa1 || c == 0xad => format!("\\u{:04x}", c),
        c => (c as char).to_string(),
    };
    format!("invalid character '{q}' {what}")
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    /// The next byte, or Go's `unexpected EOF`.
    fn next(&mut self) -> Result<u8, String> {
        let c = *self.b.get(self.i).ok_or("unexpected EOF")?;
        self.i += 1;
        Ok(c)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn value(&mut self) -> Step {
        let c = self.next()?;
        match c {
            b'{' => self.object(),
            b'[' => self.array(),
            b'"' => self.string(),
            b'-' | b'0'..=b'9' => self.number(c),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            c => Err(invalid(c, "looking for beginning of value")),
        }
    }

    fn literal(&mut self, word: &str) -> Step {
        for want in word.bytes().skip(1) {
            let c = self.next()?;
            if c != want {
                return Err(invalid(
                    c,
                    &format!("in literal {word} (expecting '{}')", want as char),
                ));
            }
        }
        Ok(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    /// A digit must come next (at the end of the body: `unexpected EOF`).
    fn digit(&mut self, what: &str) -> Step {
        match self.peek() {
            None => Err("unexpected EOF".into()),
            Some(b'0'..=b'9') => Ok(()),
            Some(c) => Err(invalid(c, what)),
        }
    }

    fn number(&mut self, first: u8) -> Step {
        let first = if first == b'-' {
            self.digit("in numeric literal")?;
            self.next()?
        } else {
            first
        };
        if first != b'0' {
            self.digits();
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digit("after decimal point in numeric literal")?;
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.digit("in exponent of numeric literal")?;
            self.digits();
        }
        Ok(())
    }

    fn string(&mut self) -> Step {
        loop {
            match self.next()? {
                b'"' => return Ok(()),
                b'\\' => match self.next()? {
                    b'b' | b'f' | b'n' | b'r' | b't' | b'\\' | b'/' | b'"' => {}
                    b'u' => {
                        for _ in 0..4 {
                            let h = self.next()?;
                            if !h.is_ascii_hexdigit() {
                                return Err(invalid(h, "in \\u hexadecimal character escape"));
                            }
                        }
                    }
                    c => return Err(invalid(c, "in string escape code")),
                },
                c if c < 0x20 => return Err(invalid(c, "in string literal")),
                _ => {}
            }
        }
    }

    fn object(&mut self) -> Step {
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            match self.next()? {
                b'"' => self.string()?,
                c => return Err(invalid(c, "looking for beginning of object key string")),
            }
            self.ws();
            match self.next()? {
                b':' => {}
                c => return Err(invalid(c, "after object key")),
            }
            self.ws();
            self.value()?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Ok(()),
                c => return Err(invalid(c, "after object key:value pair")),
            }
        }
    }

    fn array(&mut self) -> Step {
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            self.value()?;
            self.ws();
            match self.next()? {
                b',' => {}
                b']' => return Ok(()),
                c => return Err(invalid(c, "after array element")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::syntax_error;

    #[test]
    fn errors_read_as_gos_decoder_words() {
        for (body, want) in [
            ("", Some("EOF")),
            ("  \n", Some("EOF")),
            ("{\"name\":", Some("unexpected EOF")),
            (
                "x",
                Some("invalid character 'x' looking for beginning of value"),
            ),
            ("{\"a\" 1}", Some("invalid character '1' after object key")),
            (
                "{\"a\":1 \"b\":2}",
                Some("invalid character '\"' after object key:value pair"),
            ),
            ("[1 2]", Some("invalid character '2' after array element")),
            (
                "{1:2}",
                Some("invalid character '1' looking for beginning of object key string"),
            ),
            (
                "{\"a\":1,}",
                Some("invalid character '}' looking for beginning of object key string"),
            ),
            (
                "trx",
                Some("invalid character 'x' in literal true (expecting 'u')"),
            ),
            ("tru", Some("unexpected EOF")),
            (
                "{\"a\":-x}",
                Some("invalid character 'x' in numeric literal"),
            ),
            (
                "1.x",
                Some("invalid character 'x' after decimal point in numeric literal"),
            ),
            (
                "1ex",
                Some("invalid character 'x' in exponent of numeric literal"),
            ),
            (
                "\"a\\q\"",
                Some("invalid character 'q' in string escape code"),
            ),
            (
                "\"a\nb\"",
                Some("invalid character '\\n' in string literal"),
            ),
            (
                "\"\\u12g4\"",
                Some("invalid character 'g' in \\u hexadecimal character escape"),
            ),
            (
                "{\"a\":'x'}",
                Some("invalid character '\\'' looking for beginning of value"),
            ),
            // Well formed, and what follows the first value is never read.
            (
                "{\"name\":\"a\",\"options\":[{\"x\":-1.5e+3},true,null]}",
                None,
            ),
            ("{} trailing", None),
            ("01", None),
        ] {
            assert_eq!(syntax_error(body.as_bytes()).as_deref(), want, "{body:?}");
        }
    }
}
