//! The syntax error Go's `encoding/json` Decoder reports for a request body, in its words
//! (`EOF`, `unexpected EOF`, `invalid character 'x' looking for beginning of value`, …), so
//! that the simulator's 400s read as fleetd's. Only the first value counts, as with
//! `json.NewDecoder(body).Decode(&v)`: what follows it is never read. A well-formed body
//! is then decoded as Go fills the Go type fleet decodes into ([`decode`]): keys matched
//! exactly or, failing that, regardless of case; `null` leaving a field as it was; the
//! first type error in Go's words (`json: cannot unmarshal number into Go struct field
//! Unit.name of type string`, the field named by its path from the root as Go 1.20 and
//! later do).

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

/// What a request body is decoded into, as Go's `encoding/json` sees the Go type: enough
/// to give Go's answer for a well-formed body of the wrong shape.
#[derive(Debug)]
pub(crate) enum Shape {
    /// A Go `string`: `null` leaves it as it was.
    Str,
    /// A Go struct (or pointer to one): `name` is the type's name (`Unit`), `path` its
    /// package-qualified type (`schema.Unit`), `fields` the JSON keys of its fields.
    Struct {
        name: &'static str,
        path: &'static str,
        fields: &'static [(&'static str, Shape)],
    },
    /// A Go slice: `path` is its type (`[]*schema.UnitOption`); `null` empties it.
    Slice {
        path: &'static str,
        elem: &'static Shape,
    },
}

/// fleet's `schema.UnitOption`.
const UNIT_OPTION: Shape = Shape::Struct {
    name: "UnitOption",
    path: "schema.UnitOption",
    fields: &[
        ("name", Shape::Str),
        ("section", Shape::Str),
        ("value", Shape::Str),
    ],
};

/// fleet's `schema.Unit`, the body of `PUT /units/NAME`.
pub(crate) const UNIT: Shape = Shape::Struct {
    name: "Unit",
    path: "schema.Unit",
    fields: &[
        ("currentState", Shape::Str),
        ("desiredState", Shape::Str),
        ("machineID", Shape::Str),
        ("name", Shape::Str),
        (
            "options",
            Shape::Slice {
                path: "[]*schema.UnitOption",
                elem: &UNIT_OPTION,
            },
        ),
    ],
};

/// The nested value of a metadata op (reference A.5: `"value":{"value":"web"}`).
const OP_VALUE: Shape = Shape::Struct {
    name: "ValueType",
    path: "api.ValueType",
    fields: &[("value", Shape::Str)],
};

/// The body of `PATCH /machines`: a list of fleet's `machineMetadataOp`.
pub(crate) const METADATA_OPS: Shape = Shape::Slice {
    path: "[]api.machineMetadataOp",
    elem: &Shape::Struct {
        name: "machineMetadataOp",
        path: "api.machineMetadataOp",
        fields: &[
            ("op", Shape::Str),
            ("path", Shape::Str),
            ("Value", OP_VALUE),
        ],
    },
};

/// A JSON value with its object keys in the order they came, as Go's Decoder walks them.
#[derive(Debug)]
enum Tree {
    Null,
    Bool,
    Number,
    Str(String),
    Array(Vec<Tree>),
    Object(Vec<(String, Tree)>),
}

impl<'de> serde::Deserialize<'de> for Tree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Tree, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Tree;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Tree, E> {
                Ok(Tree::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Tree, E> {
                Ok(Tree::Bool)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Tree, E> {
                Ok(Tree::Number)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Tree, E> {
                Ok(Tree::Number)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Tree, E> {
                Ok(Tree::Number)
            }
            fn visit_str<E>(self, s: &str) -> Result<Tree, E> {
                Ok(Tree::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Tree, E> {
                Ok(Tree::Str(s))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut v = Vec::new();
                while let Some(t) = a.next_element()? {
                    v.push(t);
                }
                Ok(Tree::Array(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = a.next_entry::<String, Tree>()? {
                    v.push(kv);
                }
                Ok(Tree::Object(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Tree {
    /// The word Go's errors use for this kind of value.
    fn kind(&self) -> &'static str {
        match self {
            Tree::Null => "null",
            Tree::Bool => "bool",
            Tree::Number => "number",
            Tree::Str(_) => "string",
            Tree::Array(_) => "array",
            Tree::Object(_) => "object",
        }
    }
}

/// Where Go's Decoder is: the struct it is filling and the JSON keys from the root
/// (Go 1.20 and later name the field by its whole path).
#[derive(Clone, Copy)]
struct Context<'a> {
    strukt: Option<&'static str>,
    fields: &'a [&'static str],
}

impl Context<'_> {
    /// Go's `UnmarshalTypeError` text.
    fn type_error(&self, value: &str, go_type: &str) -> String {
        match self.strukt {
            Some(s) => format!(
                "json: cannot unmarshal {value} into Go struct field {s}.{} of type {go_type}",
                self.fields.join(".")
            ),
            None => format!("json: cannot unmarshal {value} into Go value of type {go_type}"),
        }
    }
}

/// Fills `into` from `t` as Go's Decoder fills a value of `shape` (nothing where Go leaves
/// the value as it was); the first type error is kept in `err` and decoding goes on, as Go's
/// does.
fn fill(
    t: &Tree,
    shape: &Shape,
    into: &mut serde_json::Value,
    cx: Context<'_>,
    err: &mut Option<String>,
) {
    let mut fail = |go_type: &str| {
        if err.is_none() {
            *err = Some(cx.type_error(t.kind(), go_type));
        }
    };
    match (shape, t) {
        (_, Tree::Null) => {
            if let Shape::Slice { .. } = shape {
                *into = serde_json::Value::Array(Vec::new());
            }
        }
        (Shape::Str, Tree::Str(s)) => *into = serde_json::Value::String(s.clone()),
        (Shape::Str, _) => fail("string"),
        (Shape::Slice { elem, .. }, Tree::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                let mut v = serde_json::Value::Object(Default::default());
                fill(item, elem, &mut v, cx, err);
                out.push(v);
            }
            *into = serde_json::Value::Array(out);
        }
        (Shape::Slice { path, .. }, _) => fail(path),
        (
            Shape::Struct {
                name,
                fields: known,
                ..
            },
            Tree::Object(entries),
        ) => {
            if !into.is_object() {
                *into = serde_json::Value::Object(Default::default());
            }
            for (key, value) in entries {
                // An exact match first, then one that differs only in case.
                let Some((json_name, field_shape)) = known
                    .iter()
                    .find(|(n, _)| n == key)
                    .or_else(|| known.iter().find(|(n, _)| n.eq_ignore_ascii_case(key)))
                else {
                    continue;
                };
                let mut path = cx.fields.to_vec();
                path.push(json_name);
                let inner = Context {
                    strukt: Some(name),
                    fields: &path,
                };
                if let serde_json::Value::Object(m) = into {
                    let slot = m.entry(*json_name).or_insert(serde_json::Value::Null);
                    fill(value, field_shape, slot, inner, err);
                    if slot.is_null() {
                        m.remove(*json_name);
                    }
                }
            }
        }
        (Shape::Struct { path, .. }, _) => fail(path),
    }
}

/// Decodes the first JSON value of a request body as Go's `json.NewDecoder(body).Decode`
/// would into a Go value of `shape`, with Go's error text; what follows the first value
/// is never read. Go leaves a `null` element of a slice of pointers nil; here it is an
/// empty struct.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8], shape: &Shape) -> Result<T, String> {
    if let Some(e) = syntax_error(b) {
        return Err(e);
    }
    let tree = serde_json::Deserializer::from_slice(b)
        .into_iter::<Tree>()
        .next()
        .unwrap_or_else(|| Err(serde::de::Error::custom("EOF")))
        .map_err(|e| e.to_string())?;
    let mut v = match shape {
        Shape::Slice { .. } => serde_json::Value::Array(Vec::new()),
        _ => serde_json::Value::Object(Default::default()),
    };
    let mut err = None;
    fill(
        &tree,
        shape,
        &mut v,
        Context {
            strukt: None,
            fields: &[],
        },
        &mut err,
    );
    if let Some(e) = err {
        return Err(e);
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
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

#[cfg(test)]
mod decode_tests {
    use super::{decode, METADATA_OPS, UNIT};
    use crate::fleet::schema::Unit;

    #[test]
    fn a_body_of_the_wrong_shape_gets_gos_type_error() {
        for (body, want) in [
            (
                r#"{"name":1}"#,
                "json: cannot unmarshal number into Go struct field Unit.name of type string",
            ),
            (
                "[]",
                "json: cannot unmarshal array into Go value of type schema.Unit",
            ),
            (
                r#""a.service""#,
                "json: cannot unmarshal string into Go value of type schema.Unit",
            ),
            (
                r#"{"options":"x"}"#,
                "json: cannot unmarshal string into Go struct field Unit.options of type []*schema.UnitOption",
            ),
            (
                r#"{"options":{}}"#,
                "json: cannot unmarshal object into Go struct field Unit.options of type []*schema.UnitOption",
            ),
            (
                r#"{"options":[1]}"#,
                "json: cannot unmarshal number into Go struct field Unit.options of type schema.UnitOption",
            ),
            (
                r#"{"options":[{"name":true}]}"#,
                "json: cannot unmarshal bool into Go struct field UnitOption.options.name of type string",
            ),
            // The first error is the one told; decoding went on past it.
            (
                r#"{"desiredState":{},"name":1}"#,
                "json: cannot unmarshal object into Go struct field Unit.desiredState of type string",
            ),
        ] {
            let got = decode::<Unit>(body.as_bytes(), &UNIT);
            assert_eq!(got.err().as_deref(), Some(want), "{body}");
        }
    }

    #[test]
    fn keys_match_regardless_of_case_and_null_changes_nothing() {
        let u: Unit = decode(
            br#"{"NAME":"a.service","DesiredState":"launched","machineid":null,"name":null,
                 "options":[{"name":"ExecStartPre","section":"Service"},{"Name":"x","value":"1"}],
                 "unknown":[1,2]} trailing"#,
            &UNIT,
        )
        .expect("decodes");
        assert_eq!(u.name, "a.service");
        assert_eq!(u.desired_state, "launched");
        assert_eq!(u.machine_id, "");
        assert_eq!(u.options.len(), 2);
        assert_eq!(u.options[0].name, "ExecStartPre");
        assert_eq!(u.options[0].value, "");
        assert_eq!(u.options[1].name, "x");
        // An exact match wins over one in another case; the last value wins.
        let u: Unit = decode(br#"{"name":"a","Name":"b","name":"c"}"#, &UNIT).expect("decodes");
        assert_eq!(u.name, "c");
        let u: Unit = decode(b"null", &UNIT).expect("decodes");
        assert_eq!(u, Unit::default());
    }

    #[test]
    fn metadata_ops_read_as_fleets_struct() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Op {
            #[serde(default)]
            op: String,
            #[serde(default)]
            path: String,
            #[serde(rename = "Value")]
            value: Option<serde_json::Value>,
        }
        for (body, want) in [
            (
                r#"{"op":"add"}"#,
                "json: cannot unmarshal object into Go value of type []api.machineMetadataOp",
            ),
            (
                r#"["add"]"#,
                "json: cannot unmarshal string into Go value of type api.machineMetadataOp",
            ),
            (
                r#"[{"op":"add","path":"/m/metadata/k","value":"web"}]"#,
                "json: cannot unmarshal string into Go struct field machineMetadataOp.Value of type api.ValueType",
            ),
            (
                r#"[{"op":"add","path":"/m/metadata/k","value":{"value":7}}]"#,
                "json: cannot unmarshal number into Go struct field ValueType.Value.value of type string",
            ),
        ] {
            let got = decode::<Vec<Op>>(body.as_bytes(), &METADATA_OPS);
            assert_eq!(got.err().as_deref(), Some(want), "{body}");
        }
        let ops: Vec<Op> = decode(
            br#"[{"OP":"add","Path":"/m/metadata/k","value":{"VALUE":"web"}}]"#,
            &METADATA_OPS,
        )
        .expect("decodes");
        assert_eq!(ops[0].op, "add");
        assert_eq!(ops[0].value, Some(serde_json::json!({"value": "web"})));
    }
}
