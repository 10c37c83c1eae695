//! A small document tree that remembers where every node came from.
//!
//! Plans arrive as YAML files (where errors must say file:line:column) and
//! as JSON values (from Postgres and the admin API, where there is no
//! location). Both become this tree, and one validator checks it.
//!
//! YAML is read with `saphyr-parser`'s event stream because its events carry
//! source marks; a serde deserializer would lose them.
//!
//! Hostile documents are bounded in work and memory: the text's size
//! ([`MAX_TEXT_BYTES`]), the nesting depth, and the number of nodes the
//! document expands to ([`MAX_NODES`], aliases counted at the size of what
//! they name, so a "billion laughs" file is refused at the alias that
//! crosses the bound). An alias shares the anchored node (an `Rc`, no copy)
//! and anchors are found by id in a map, so reading is linear in the text.

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// Deeper nesting than this is refused: no plans file needs it, and it keeps
/// the recursive clone and drop of the tree far from the stack's limit.
const MAX_DEPTH: usize = 64;

/// A plans document may be at most this long (the admin API's body limit
/// too): a plans file with thousands of plans is well under 1 MiB.
pub(crate) const MAX_TEXT_BYTES: usize = 4 << 20;

/// A document may expand to at most this many nodes, aliases counted at the
/// size of the node they name. The checks walk the expanded tree, so this
/// bounds their work as well as the parser's; a plans file with thousands
/// of plans has tens of thousands of nodes.
pub(crate) const MAX_NODES: usize = 1_000_000;

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

/// A node's content. Cloning is cheap (reference counts): an alias and its
/// anchor share their scalar text and their children.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `~`, `null`, an empty value, or JSON `null`.
    Null,
    /// Any scalar, as written. `plain` is false for quoted and block
    /// scalars (and JSON strings): only plain scalars count as numbers.
    Scalar {
        text: Rc<str>,
        plain: bool,
    },
    Seq(Rc<[Node]>),
    /// Entries in document order; duplicates are kept for the validator to
    /// report.
    Map(Rc<[(Node, Node)]>),
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

/// A YAML syntax error or a structural limit, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub message: String,
    /// The document is well-formed but over one of this module's bounds.
    pub limit: bool,
}

impl SyntaxError {
    fn limit(pos: Pos, message: String) -> Self {
        SyntaxError {
            pos,
            message,
            limit: true,
        }
    }
}

/// The error for a document over [`MAX_TEXT_BYTES`].
pub(crate) fn too_long() -> SyntaxError {
    SyntaxError::limit(
        Pos::default(),
        format!(
            "the document is longer than {MAX_TEXT_BYTES} bytes ({} MiB), the most allowed",
            MAX_TEXT_BYTES >> 20
        ),
    )
}

/// Parse a YAML (or JSON) document into a located tree. An empty document
/// yields `None`.
pub(crate) fn parse_yaml(text: &str) -> Result<Option<Node>, SyntaxError> {
    parse_counted(text).map(|(root, _)| root)
}

/// [`parse_yaml`], also returning how many nodes the document expands to.
fn parse_counted(text: &str) -> Result<(Option<Node>, usize), SyntaxError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(too_long());
    }
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
            limit: false,
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
                        limit: false,
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let value = scalar_value(text, style);
                builder.count(pos, 1)?;
                builder.push(Node { pos, value }, 1, anchor);
            }
            Event::Alias(anchor) => builder.push_alias(anchor, pos)?,
            Event::SequenceStart(anchor, _) => builder.open(pos, Open::Seq(Vec::new()), anchor)?,
            Event::MappingStart(anchor, _) => {
                builder.open(pos, Open::Map(Vec::new(), None), anchor)?
            }
            Event::SequenceEnd | Event::MappingEnd => builder.close(),
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
    }
    Ok((builder.root, builder.nodes))
}

fn scalar_value(text: Cow<'_, str>, style: ScalarStyle) -> Value {
    match style {
        ScalarStyle::Plain => match &*text {
            "" | "~" | "null" | "Null" | "NULL" => Value::Null,
            _ => Value::Scalar {
                text: Rc::from(&*text),
                plain: true,
            },
        },
        _ => Value::Scalar {
            text: Rc::from(&*text),
            plain: false,
        },
    }
}

/// A collection being read.
enum Open {
    Seq(Vec<Node>),
    /// The entries so far, and a key waiting for its value.
    Map(Vec<(Node, Node)>, Option<Node>),
}

/// A collection being read, where it started, its anchor id and how many
/// nodes it expands to so far (itself included).
struct Frame {
    pos: Pos,
    open: Open,
    anchor: usize,
    size: usize,
}

/// Turns the flat event stream into a tree, without recursion.
#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    /// Anchored nodes (shared with the tree) and their expanded sizes, by
    /// anchor id. The parser gives every anchor definition an id of its own
    /// (a redefined name gets a new one) and resolves alias names to ids.
    anchors: HashMap<usize, (Value, usize)>,
    /// Nodes the document expands to so far.
    nodes: usize,
}

impl Builder {
    /// Count `size` more nodes, refusing the document (at `pos`) when it
    /// expands to more than [`MAX_NODES`].
    fn count(&mut self, pos: Pos, size: usize) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(size);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError::limit(
                pos,
                format!(
                    "the document expands to more than {MAX_NODES} nodes (aliases count \
                     as many nodes as they name)"
                ),
            ));
        }
        Ok(())
    }

    fn open(&mut self, pos: Pos, open: Open, anchor: usize) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(SyntaxError::limit(
                pos,
                format!("nesting deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.count(pos, 1)?;
        self.stack.push(Frame {
            pos,
            open,
            anchor,
            size: 1,
        });
        Ok(())
    }

    fn close(&mut self) {
        let Some(Frame {
            pos,
            open,
            anchor,
            size,
        }) = self.stack.pop()
        else {
            return;
        };
        let value = match open {
            Open::Seq(items) => Value::Seq(items.into()),
            Open::Map(mut entries, pending_key) => {
                if let Some(key) = pending_key {
                    // The parser always emits a value (possibly empty) for a
                    // key; should it not, the key reads as having an empty
                    // value.
                    let pos = key.pos;
                    entries.push((
                        key,
                        Node {
                            pos,
                            value: Value::Null,
                        },
                    ));
                }
                Value::Map(entries.into())
            }
        };
        self.push(Node { pos, value }, size, anchor);
    }

    /// Attach a complete node that expands to `size` nodes, remembering it
    /// under `anchor` (0: none).
    fn push(&mut self, node: Node, size: usize, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, (node.value.clone(), size));
        }
        self.attach(node, size);
    }

    fn push_alias(&mut self, anchor: usize, pos: Pos) -> Result<(), SyntaxError> {
        let Some((value, size)) = self.anchors.get(&anchor) else {
            return Err(SyntaxError {
                pos,
                message: "alias to an unknown anchor".into(),
                limit: false,
            });
        };
        let (value, size) = (value.clone(), *size);
        self.count(pos, size)?;
        self.attach(Node { pos, value }, size);
        Ok(())
    }

    fn attach(&mut self, node: Node, size: usize) {
        let Some(parent) = self.stack.last_mut() else {
            if self.root.is_none() {
                self.root = Some(node);
            }
            return;
        };
        parent.size = parent.size.saturating_add(size);
        match &mut parent.open {
            Open::Seq(items) => items.push(node),
            Open::Map(entries, pending_key) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

/// A JSON value as a tree without locations.
pub(crate) fn from_json(value: &serde_json::Value) -> Result<Node, SyntaxError> {
    from_json_at(value, 0)
}

fn from_json_at(value: &serde_json::Value, depth: usize) -> Result<Node, SyntaxError> {
    if depth > MAX_DEPTH {
        return Err(SyntaxError::limit(
            Pos::default(),
            format!("nesting deeper than {MAX_DEPTH} levels"),
        ));
    }
    let value = match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Scalar {
            text: b.to_string().into(),
            plain: true,
        },
        serde_json::Value::Number(n) => Value::Scalar {
            text: n.to_string().into(),
            plain: true,
        },
        serde_json::Value::String(s) => Value::Scalar {
            text: Rc::from(s.as_str()),
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
                            text: Rc::from(k.as_str()),
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
    fn aliases_share_the_anchored_node() {
        let root = parse_yaml("a: &w [1, 2]\nb: *w\nc: &s text\nd: *s\n")
            .unwrap()
            .unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("expected a map")
        };
        assert_eq!(entries[0].1.value, entries[1].1.value);
        // The alias is where it is written; what it names is shared, not
        // copied.
        assert_eq!(entries[1].1.pos, Pos { line: 2, col: 4 });
        let (Value::Seq(anchored), Value::Seq(alias)) = (&entries[0].1.value, &entries[1].1.value)
        else {
            panic!("expected lists")
        };
        assert!(Rc::ptr_eq(anchored, alias));
        let (Value::Scalar { text: anchored, .. }, Value::Scalar { text: alias, .. }) =
            (&entries[2].1.value, &entries[3].1.value)
        else {
            panic!("expected scalars")
        };
        assert!(Rc::ptr_eq(anchored, alias));
    }

    #[test]
    fn a_redefined_anchor_names_its_latest_node() {
        let root = parse_yaml("a: &x 1\nb: &x 2\nc: *x\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("expected a map")
        };
        assert_eq!(entries[2].1.value, scalar("2"));
    }

    /// The document: 225k anchors, each aliased once (4 MiB, as
    /// sent to `PUT /admin/plans`). Reading it is linear: every alias
    /// shares its anchor's node, and the count of nodes is exactly what
    /// was written. (The old reader searched and rewrote its list of
    /// anchors for every anchor and alias: minutes for this document.)
    #[test]
    fn many_anchors_and_aliases_are_read_linearly() {
        const N: usize = 225_000;
        let mut doc = String::from("[");
        for i in 0..N {
            doc.push_str(&format!("&a{i:x} v,*a{i:x},"));
        }
        doc.push_str("end]\n");
        assert!(doc.len() <= MAX_TEXT_BYTES, "{}", doc.len());
        let (root, nodes) = parse_counted(&doc).unwrap();
        // The list, 2 nodes per anchor, and `end`.
        assert_eq!(nodes, 1 + 2 * N + 1);
        let Value::Seq(items) = &root.unwrap().value else {
            panic!("expected a list")
        };
        assert_eq!(items.len(), 2 * N + 1);
        for pair in items[..2 * N].chunks(2) {
            let (Value::Scalar { text: a, .. }, Value::Scalar { text: b, .. }) =
                (&pair[0].value, &pair[1].value)
            else {
                panic!("expected scalars: {pair:?}")
            };
            assert!(Rc::ptr_eq(a, b), "{a} and {b} share their text");
        }
        assert_eq!(items[2 * N].value, scalar("end"));
    }

    /// "Billion laughs": each anchor names a list of two aliases of the
    /// previous one, 30 times over (2^31 nodes expanded). It is refused at
    /// the alias that takes the document past [`MAX_NODES`], by the size
    /// of what the aliases name, long before memory is at risk.
    #[test]
    fn alias_bombs_are_refused_where_they_cross_the_bound() {
        let mut doc = String::from("a0: &a0 [x, x]\n");
        for i in 1..=30 {
            let p = i - 1;
            doc.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}]\n"));
        }
        // Where the count crosses the bound: the root, then per line a key
        // and a list of two aliases of the previous list.
        let mut nodes = 1 + 1 + 3; // root, `a0`, [x, x]
        let mut size = 3;
        let mut at = None;
        'lines: for i in 1..=30usize {
            nodes += 2; // the key and the list
            let line = format!("a{i}: &a{i} [*a{}, *a{}]", i - 1, i - 1);
            let cols: Vec<usize> = line.match_indices('*').map(|(c, _)| c + 1).collect();
            for col in cols {
                nodes += size;
                if nodes > MAX_NODES {
                    at = Some(Pos { line: i + 1, col });
                    break 'lines;
                }
            }
            size = 1 + 2 * size;
        }
        let err = parse_yaml(&doc).unwrap_err();
        assert_eq!(
            err.message,
            format!(
                "the document expands to more than {MAX_NODES} nodes (aliases count as many \
                 nodes as they name)"
            )
        );
        assert!(err.limit);
        assert_eq!(Some(err.pos), at, "{err:?}");
        // Ten times ten, as before.
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse_yaml(&doc).unwrap_err();
        assert!(err.message.contains("expands to more than"), "{err:?}");
    }

    #[test]
    fn documents_are_bounded_in_nodes_without_aliases_too() {
        let doc = format!("[{}]", "1,".repeat(MAX_NODES));
        let err = parse_yaml(&doc).unwrap_err();
        assert!(err.message.contains("expands to more than"), "{err:?}");
        assert_eq!(err.pos.line, 1);
        let doc = format!("[{}]", "1,".repeat(MAX_NODES - 2));
        assert_eq!(parse_counted(&doc).unwrap().1, MAX_NODES - 1);
    }

    #[test]
    fn documents_over_the_size_bound_are_refused() {
        let at_bound = format!("a: {}\n", "x".repeat(MAX_TEXT_BYTES - 4));
        assert_eq!(at_bound.len(), MAX_TEXT_BYTES);
        assert!(parse_yaml(&at_bound).is_ok());
        let over = format!("{at_bound} ");
        let err = parse_yaml(&over).unwrap_err();
        assert!(err.limit);
        assert_eq!(
            err.message,
            "the document is longer than 4194304 bytes (4 MiB), the most allowed"
        );
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
