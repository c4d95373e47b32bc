//! Python's unpickler for the opcodes `torch.save` (protocol 2) and
//! Python's pickler up to protocol 4 write, into candle's pickle `Object`
//! tree. Written here instead of candle's `Stack` because that one reverses
//! the items of every SETITEMS (a state dict's order is its meaning: torch
//! numbers parameters by it, DeepSpeed lays out partitions by it) and
//! copies memoized containers before they are filled.
//!
//! Objects live in an arena while the pickle runs, so a container filled
//! after it was memoized is seen whole by every later reference, as in
//! Python; the root is resolved into a tree at STOP.

use candle_core::pickle::Object;

/// An arena slot: a finished value, or a container still being filled.
enum Node {
    Leaf(Object),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Reduce(usize, usize),
    Build(usize, usize),
    PersId(usize),
}

struct Machine {
    nodes: Vec<Node>,
    /// Objects `resolve` may still produce: shared references are copied,
    /// and a small pickle of nested references must not expand without end.
    budget: std::cell::Cell<usize>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u32, usize>,
}

fn err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Bytes read from the pickle, with a clear error at its end.
struct Input<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> std::io::Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                err(format!(
                    "the pickle ends inside an opcode at byte {}",
                    self.at
                ))
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> std::io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn line(&mut self) -> std::io::Result<String> {
        let rest = &self.b[self.at..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| err("a GLOBAL without its newline"))?;
        let s = String::from_utf8_lossy(self.take(n)?).into_owned();
        self.at += 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> std::io::Result<String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| err("a string that is not UTF-8"))
    }
}

impl Machine {
    fn push(&mut self, n: Node) {
        self.nodes.push(n);
        self.stack.push(self.nodes.len() - 1);
    }

    fn leaf(&mut self, o: Object) {
        self.push(Node::Leaf(o));
    }

    fn pop(&mut self) -> std::io::Result<usize> {
        self.stack
            .pop()
            .ok_or_else(|| err("the pickle pops an empty stack"))
    }

    fn top(&self) -> std::io::Result<usize> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| err("the pickle reads an empty stack"))
    }

    fn pop_mark(&mut self) -> std::io::Result<Vec<usize>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| err("the pickle has no MARK to pop to"))?;
        if m > self.stack.len() {
            return Err(err("a MARK above the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn set_items(&mut self, target: usize, items: Vec<usize>) -> std::io::Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(err("SETITEMS with an odd number of items"));
        }
        let Node::Dict(d) = &mut self.nodes[target] else {
            return Err(err("SETITEMS on something that is not a dict"));
        };
        d.extend(items.chunks(2).map(|kv| (kv[0], kv[1])));
        Ok(())
    }

    fn append(&mut self, target: usize, items: Vec<usize>) -> std::io::Result<()> {
        let Node::List(l) = &mut self.nodes[target] else {
            return Err(err("APPENDS on something that is not a list"));
        };
        l.extend(items);
        Ok(())
    }

    /// The tree of node `i` (shared nodes copied; a cycle is refused).
    fn resolve(&self, i: usize, depth: usize) -> std::io::Result<Object> {
        if depth > 200 {
            return Err(err("a pickle nested more than 200 deep (or a cycle)"));
        }
        let left = self.budget.get();
        if left == 0 {
            return Err(err(
                "a pickle whose shared references expand to far more objects than it holds",
            ));
        }
        self.budget.set(left - 1);
        let r = |j: usize| self.resolve(j, depth + 1);
        let all = |v: &[usize]| v.iter().map(|&j| r(j)).collect::<std::io::Result<Vec<_>>>();
        Ok(match &self.nodes[i] {
            Node::Leaf(o) => o.clone(),
            Node::List(v) => Object::List(all(v)?),
            Node::Tuple(v) => Object::Tuple(all(v)?),
            Node::Dict(kv) => Object::Dict(
                kv.iter()
                    .map(|&(k, v)| Ok((r(k)?, r(v)?)))
                    .collect::<std::io::Result<_>>()?,
            ),
            Node::Reduce(c, a) => Object::Reduce {
                callable: Box::new(r(*c)?),
                args: Box::new(r(*a)?),
            },
            Node::Build(o, s) => Object::Build {
                callable: Box::new(r(*o)?),
                args: Box::new(r(*s)?),
            },
            Node::PersId(p) => Object::PersistentLoad(Box::new(r(*p)?)),
        })
    }
}

/// Run the pickle `b` and return its value.
pub fn unpickle(b: &[u8]) -> std::io::Result<Object> {
    let mut m = Machine {
        nodes: Vec::new(),
        budget: std::cell::Cell::new(0),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Default::default(),
    };
    let mut inp = Input { b, at: 0 };
    loop {
        let at = inp.at;
        let op = inp.u8()?;
        match op {
            0x80 => {
                inp.u8()?; // PROTO
            }
            0x95 => {
                inp.take(8)?; // FRAME
            }
            b'.' => {
                let top = m.pop()?;
                m.budget.set(16 * m.nodes.len() + 100_000);
                return m.resolve(top, 0);
            }
            b'(' => m.marks.push(m.stack.len()),
            b'0' => {
                m.pop()?;
            }
            b'2' => {
                let t = m.top()?;
                m.stack.push(t);
            }
            b'N' => m.leaf(Object::None),
            0x88 => m.leaf(Object::Bool(true)),
            0x89 => m.leaf(Object::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(inp.take(4)?.try_into().expect("4"));
                m.leaf(Object::Int(v))
            }
            b'K' => {
                let v = inp.u8()?;
                m.leaf(Object::Int(v as i32))
            }
            b'M' => {
                let v = u16::from_le_bytes(inp.take(2)?.try_into().expect("2"));
                m.leaf(Object::Int(v as i32))
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    inp.u8()? as usize
                } else {
                    inp.u32()? as usize
                };
                if n > 8 {
                    return Err(err(format!("an integer of {n} bytes (more than 64 bits)")));
                }
                let bytes = inp.take(n)?;
                let mut v: i64 = 0;
                for (i, &x) in bytes.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                // Two's complement: sign-extend from the last byte.
                if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                m.leaf(Object::Long(v))
            }
            b'G' => {
                let v = f64::from_be_bytes(inp.take(8)?.try_into().expect("8"));
                m.leaf(Object::Float(v))
            }
            b'X' => {
                let n = inp.u32()? as usize;
                let s = inp.text(n)?;
                m.leaf(Object::Unicode(s))
            }
            0x8c => {
                let n = inp.u8()? as usize;
                let s = inp.text(n)?;
                m.leaf(Object::Unicode(s))
            }
            b']' => m.push(Node::List(vec![])),
            b'l' => {
                let items = m.pop_mark()?;
                m.push(Node::List(items))
            }
            b'a' => {
                let v = m.pop()?;
                let t = m.top()?;
                m.append(t, vec![v])?;
            }
            b'e' => {
                let items = m.pop_mark()?;
                let t = m.top()?;
                m.append(t, items)?;
            }
            b')' => m.push(Node::Tuple(vec![])),
            b't' => {
                let items = m.pop_mark()?;
                m.push(Node::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if m.stack.len() < n {
                    return Err(err("a TUPLE of more items than the stack holds"));
                }
                let items = m.stack.split_off(m.stack.len() - n);
                m.push(Node::Tuple(items))
            }
            b'}' => m.push(Node::Dict(vec![])),
            b'd' => {
                let items = m.pop_mark()?;
                m.push(Node::Dict(vec![]));
                let t = m.top()?;
                m.set_items(t, items)?;
            }
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                let t = m.top()?;
                m.set_items(t, vec![k, v])?;
            }
            b'u' => {
                let items = m.pop_mark()?;
                let t = m.top()?;
                m.set_items(t, items)?;
            }
            b'c' => {
                let module_name = inp.line()?;
                let class_name = inp.line()?;
                m.leaf(Object::Class {
                    module_name,
                    class_name,
                })
            }
            0x93 => {
                let name = m.pop()?;
                let module = m.pop()?;
                let (
                    Node::Leaf(Object::Unicode(module_name)),
                    Node::Leaf(Object::Unicode(class_name)),
                ) = (&m.nodes[module], &m.nodes[name])
                else {
                    return Err(err("STACK_GLOBAL without two strings"));
                };
                let o = Object::Class {
                    module_name: module_name.clone(),
                    class_name: class_name.clone(),
                };
                m.leaf(o)
            }
            b'R' | 0x81 => {
                let args = m.pop()?;
                let callable = m.pop()?;
                // OrderedDict() is filled by SETITEMS: a dict here.
                let ordered = matches!(&m.nodes[callable], Node::Leaf(Object::Class { module_name, class_name })
                    if module_name == "collections" && class_name == "OrderedDict");
                if ordered {
                    m.push(Node::Dict(vec![]))
                } else {
                    m.push(Node::Reduce(callable, args))
                }
            }
            b'b' => {
                let state = m.pop()?;
                let obj = m.pop()?;
                m.push(Node::Build(obj, state))
            }
            b'Q' => {
                let id = m.pop()?;
                m.push(Node::PersId(id))
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    inp.u8()? as u32
                } else {
                    inp.u32()?
                };
                let i = *m
                    .memo
                    .get(&k)
                    .ok_or_else(|| err(format!("memo {k} read before it was written")))?;
                m.stack.push(i)
            }
            b'q' | b'r' => {
                let k = if op == b'q' {
                    inp.u8()? as u32
                } else {
                    inp.u32()?
                };
                let t = m.top()?;
                m.memo.insert(k, t);
            }
            0x94 => {
                let t = m.top()?;
                let k = m.memo.len() as u32;
                m.memo.insert(k, t);
            }
            other => {
                return Err(err(format!(
                    "pickle opcode 0x{other:02x} at byte {at} is not one torch.save writes"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dicts_keep_their_order_and_memo_sees_filled_containers() {
        // pickle.dumps([{"b": 1, "a": -2}, <the same dict again>], protocol=2)
        let p = b"\x80\x02]q\x00(}q\x01(X\x01\x00\x00\x00bq\x02K\x01X\x01\x00\x00\x00aq\x03J\xfe\xff\xff\xffuh\x01e.";
        let o = unpickle(p).unwrap();
        let d = Object::Dict(vec![
            (Object::Unicode("b".into()), Object::Int(1)),
            (Object::Unicode("a".into()), Object::Int(-2)),
        ]);
        assert_eq!(o, Object::List(vec![d.clone(), d]));
        // LONG1 of -129 (two bytes, sign-extended).
        assert_eq!(
            unpickle(b"\x80\x02\x8a\x02\x7f\xff.").unwrap(),
            Object::Long(-129)
        );
        assert!(unpickle(b"\x80\x02]").is_err());
        // [x, x] nested 40 deep by memo references: 2^40 copies, refused.
        let mut bomb = b"\x80\x02N".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"q\x00h\x00\x86");
        }
        bomb.push(b'.');
        let e = unpickle(&bomb).unwrap_err().to_string();
        assert!(e.contains("expand to far more objects"), "{e}");
    }
}
