//! A small document tree that remembers where every node came from.
//!
//! Plans arrive as YAML files (where errors must say file:line:column) and
//! as JSON values (from Postgres and the admin API, where there is no
//! location). Both become this tree, and one validator checks it.
//!
//! YAML is read with `saphyr-parser`'s event stream because its events carry
//! source marks; a serde deserializer would lose them.

use std::borrow::Cow;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// Deeper nesting than this is refused: no plans file needs it, and it keeps
/// the recursive clone and drop of the tree far from the stack's limit.
const MAX_DEPTH: usize = 64;

/// Alias expansion may copy at most this many nodes in one document, so a
/// "billion laughs" file is an error rather than an out-of-memory kill.
const MAX_ALIAS_NODES: usize = 100_000;

/// Where a node starts. `line == 0` means unknown (JSON input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    /// 1-based line, or 0 when unknown.
    pub line: usize,
    /// 1-based column (in characters), or 0 when unknown.
    pub col: usize,
}

impl Pos {
    pub(crate) fn line(self) -> Option<usize> {
        (self.line > 0).then_some(self.line)
    }

    pub(crate) fn col(self) -> Option<usize> {
        (self.line > 0 && self.col > 0).then_some(self.col)
    }
}

/// One node of the document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `~`, `null`, an empty value, or JSON `null`.
    Null,
    /// Any scalar, as written. `plain` is false for quoted and block
    /// scalars (and JSON strings): only plain scalars count as numbers.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order; duplicates are kept for the validator to
    /// report.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The name of the node's kind, for "expected X, found Y" messages.
    pub(crate) fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A YAML syntax error (or a structural limit), located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parse a YAML (or JSON) document into a located tree. An empty document
/// yields `None`.
pub(crate) fn parse_yaml(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut parser = Parser::new_from_str(text);
    let mut builder = Builder::default();
    let mut documents = 0usize;
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| SyntaxError {
            pos: Pos {
                line: e.marker().line(),
                col: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })?;
        let pos = Pos {
            line: span.start.line(),
            col: span.start.col() + 1,
        };
        match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(SyntaxError {
                        pos,
                        message: "only one YAML document is allowed per file".into(),
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let value = scalar_value(text, style);
                builder.push_leaf(Node { pos, value }, anchor)?;
            }
            Event::Alias(anchor) => builder.push_alias(anchor, pos)?,
            Event::SequenceStart(anchor, _) => builder.open(pos, Value::Seq(Vec::new()), anchor)?,
            Event::MappingStart(anchor, _) => builder.open(pos, Value::Map(Vec::new()), anchor)?,
            Event::SequenceEnd | Event::MappingEnd => builder.close()?,
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
    }
    Ok(builder.root)
}

fn scalar_value(text: Cow<'_, str>, style: ScalarStyle) -> Value {
    match style {
        ScalarStyle::Plain => match &*text {
            "" | "~" | "null" | "Null" | "NULL" => Value::Null,
            _ => Value::Scalar {
                text: text.into_owned(),
                plain: true,
            },
        },
        _ => Value::Scalar {
            text: text.into_owned(),
            plain: false,
        },
    }
}

/// Turns the flat event stream into a tree, without recursion.
#[derive(Default)]
struct Builder {
    /// Open collections: the node, its anchor id, and for a mapping a key
    /// waiting for its value.
    stack: Vec<(Node, usize, Option<Node>)>,
    root: Option<Node>,
    /// Anchored nodes by anchor id, for aliases.
    anchors: Vec<(usize, Node)>,
    alias_budget_used: usize,
}

impl Builder {
    fn open(&mut self, pos: Pos, value: Value, anchor: usize) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(SyntaxError {
                pos,
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
        }
        self.stack.push((Node { pos, value }, anchor, None));
        Ok(())
    }

    fn close(&mut self) -> Result<(), SyntaxError> {
        let Some((mut node, anchor, pending_key)) = self.stack.pop() else {
            return Ok(());
        };
        if let (Some(key), Value::Map(entries)) = (pending_key, &mut node.value) {
            // The parser always emits a value (possibly empty) for a key;
            // should it not, the key reads as having an empty value.
            let pos = key.pos;
            entries.push((
                key,
                Node {
                    pos,
                    value: Value::Null,
                },
            ));
        }
        self.push_leaf(node, anchor)
    }

    fn push_leaf(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.anchors.retain(|(id, _)| *id != anchor);
            self.anchors.push((anchor, node.clone()));
        }
        self.attach(node)
    }

    fn push_alias(&mut self, anchor: usize, pos: Pos) -> Result<(), SyntaxError> {
        let Some((_, target)) = self.anchors.iter().find(|(id, _)| *id == anchor) else {
            return Err(SyntaxError {
                pos,
                message: "alias to an unknown anchor".into(),
            });
        };
        let size = count_nodes(target);
        self.alias_budget_used = self.alias_budget_used.saturating_add(size);
        if self.alias_budget_used > MAX_ALIAS_NODES {
            return Err(SyntaxError {
                pos,
                message: format!("aliases expand to more than {MAX_ALIAS_NODES} nodes"),
            });
        }
        let mut copy = target.clone();
        copy.pos = pos;
        self.attach(copy)
    }

    fn attach(&mut self, node: Node) -> Result<(), SyntaxError> {
        let Some((parent, _, pending_key)) = self.stack.last_mut() else {
            if self.root.is_none() {
                self.root = Some(node);
            }
            return Ok(());
        };
        match &mut parent.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => entries.push((key, node)),
            },
            Value::Null | Value::Scalar { .. } => {}
        }
        Ok(())
    }
}

fn count_nodes(node: &Node) -> usize {
    match &node.value {
        Value::Null | Value::Scalar { .. } => 1,
        Value::Seq(items) => items.iter().map(count_nodes).fold(1, usize::saturating_add),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| count_nodes(k).saturating_add(count_nodes(v)))
            .fold(1, usize::saturating_add),
    }
}

/// A JSON value as a tree without locations.
pub(crate) fn from_json(value: &serde_json::Value) -> Result<Node, SyntaxError> {
    from_json_at(value, 0)
}

fn from_json_at(value: &serde_json::Value, depth: usize) -> Result<Node, SyntaxError> {
    if depth > MAX_DEPTH {
        return Err(SyntaxError {
            pos: Pos::default(),
            message: format!("nesting deeper than {MAX_DEPTH} levels"),
        });
    }
    let value = match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Scalar {
            text: b.to_string(),
            plain: true,
        },
        serde_json::Value::Number(n) => Value::Scalar {
            text: n.to_string(),
            plain: true,
        },
        serde_json::Value::String(s) => Value::Scalar {
            text: s.clone(),
            plain: false,
        },
        serde_json::Value::Array(items) => Value::Seq(
            items
                .iter()
                .map(|v| from_json_at(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        serde_json::Value::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| {
                    let key = Node {
                        pos: Pos::default(),
                        value: Value::Scalar {
                            text: k.clone(),
                            plain: false,
                        },
                    };
                    Ok((key, from_json_at(v, depth + 1)?))
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(Node {
        pos: Pos::default(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(text: &str) -> Value {
        Value::Scalar {
            text: text.into(),
            plain: true,
        }
    }

    #[test]
    fn nodes_carry_their_line_and_column() {
        let root = parse_yaml("a:\n  b: 1\n  c: [x, 'y']\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("expected a map, got {root:?}")
        };
        let (_, inner) = &entries[0];
        let Value::Map(inner) = &inner.value else {
            panic!("expected a map")
        };
        assert_eq!(inner[0].0.pos, Pos { line: 2, col: 3 });
        assert_eq!(inner[0].1.pos, Pos { line: 2, col: 6 });
        assert_eq!(inner[0].1.value, scalar("1"));
        let Value::Seq(items) = &inner[1].1.value else {
            panic!("expected a list")
        };
        assert_eq!(items[1].pos, Pos { line: 3, col: 10 });
        assert_eq!(
            items[1].value,
            Value::Scalar {
                text: "y".into(),
                plain: false
            }
        );
    }

    #[test]
    fn empty_values_are_null() {
        let root = parse_yaml("a:\nb: ~\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("expected a map")
        };
        assert_eq!(entries[0].1.value, Value::Null);
        assert_eq!(entries[1].1.value, Value::Null);
    }

    #[test]
    fn aliases_copy_the_anchored_node() {
        let root = parse_yaml("a: &w [1, 2]\nb: *w\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("expected a map")
        };
        assert_eq!(entries[0].1.value, entries[1].1.value);
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse_yaml(&doc).unwrap_err();
        assert!(err.message.contains("aliases expand"), "{err:?}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let doc = "[".repeat(10_000);
        // The scanner has a recursion limit of its own for flow
        // collections; either limit must end in an error, not a crash.
        assert!(parse_yaml(&doc).is_err());
        let mut block = String::new();
        for depth in 0..100 {
            block.push_str(&" ".repeat(depth));
            block.push_str("a:\n");
        }
        let err = parse_yaml(&block).unwrap_err();
        assert!(err.message.contains("nesting"), "{err:?}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = parse_yaml("a: 1\nb: [1, 2\n").unwrap_err();
        assert!(err.pos.line >= 2, "{err:?}");
    }

    #[test]
    fn second_documents_are_refused() {
        let err = parse_yaml("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(err.pos.line, 2);
    }
}
