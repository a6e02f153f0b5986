//! A `getopt_long` work-alike with glibc's observable behaviour.
//!
//! qemu-img parses every subcommand with glibc `getopt_long`, and scripts (and QEMU's
//! iotests) compare its diagnostics byte for byte. This module reproduces what glibc does
//! as seen from the outside:
//!
//! * short option strings (`"hf:o:"`, `x:` = required argument, `x::` = optional);
//!   a leading `+` stops at the first operand, a leading `-` returns operands in order
//!   (qemu-img `resize` relies on that), otherwise operands are permuted behind the options
//!   unless `POSIXLY_CORRECT` is set;
//! * clustered flags (`-qU`), attached (`-ofoo`) and detached (`-o foo`) arguments;
//! * long options with `--name=value` or `--name value`, unambiguous prefixes
//!   (`--outp=json`), exact matches winning over prefixes, and ambiguity only between
//!   entries that differ in argument kind or meaning;
//! * `--` ends the options; a lone `-` is an operand;
//! * glibc's error texts (`invalid option -- 'Z'`, `unrecognized option '--bogus'`, ...).
//!
//! The caller supplies the name glibc would find in `argv[0]`; qemu-img uses
//! `"<argv0> <command>"` for subcommands, which is why errors read `qemu-img info: ...`.

/// Whether a long option takes an argument (glibc's `has_arg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HasArg {
    /// `no_argument`: `--name=value` is an error.
    No,
    /// `required_argument`: the value is attached with `=` or is the next word.
    Required,
    /// `optional_argument`: only an attached `=value` counts.
    Optional,
}

/// What an option means to the command: a short option letter, or an identifier for an
/// option that only exists in long form (glibc's `val` >= 256).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// Same meaning as the short option with this letter.
    Short(char),
    /// Long-only option; the number is chosen by the command.
    Long(u16),
}

/// One entry of a long option table (glibc's `struct option`).
#[derive(Clone, Copy, Debug)]
pub struct LongOpt {
    /// Name without the leading `--`.
    pub name: &'static str,
    /// Argument kind.
    pub has_arg: HasArg,
    /// Meaning reported when the option is found.
    pub key: Key,
}

impl LongOpt {
    /// Shorthand for a table entry.
    pub const fn new(name: &'static str, has_arg: HasArg, key: Key) -> Self {
        Self { name, has_arg, key }
    }
}

/// One thing found on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// An option with its argument, if it took one.
    Opt(Key, Option<String>),
    /// An operand; only produced in return-in-order mode (option string starting with `-`).
    Operand(String),
}

/// A diagnostic exactly as glibc prints it to stderr (without the trailing newline).
///
/// qemu-img follows it with `Try '<argv0> <cmd> --help' for more info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetoptError {
    /// The complete line, e.g. `qemu-img info: invalid option -- 'Z'`.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ordering {
    Permute,
    RequireOrder,
    ReturnInOrder,
}

/// Incremental parser over one command line; call [`Getopt::next_item`] until it returns
/// `None`, then take the operands with [`Getopt::operands`].
#[derive(Debug)]
pub struct Getopt<'a> {
    prog: String,
    args: &'a [String],
    short: &'a str,
    long: &'a [LongOpt],
    ordering: Ordering,
    /// Index of the next word to look at.
    pos: usize,
    /// Inside a cluster of short options: the word and the byte offset of the next letter.
    cluster: Option<(usize, usize)>,
    operands: Vec<String>,
    finished: bool,
}

impl<'a> Getopt<'a> {
    /// Prepares to parse `args` (the words after the command name, i.e. without argv[0]).
    ///
    /// `prog` is what glibc prints before each diagnostic; `short` is the option string
    /// in getopt syntax and `long` the long option table.
    pub fn new(prog: &str, args: &'a [String], short: &'a str, long: &'a [LongOpt]) -> Self {
        let posixly_correct = std::env::var_os("POSIXLY_CORRECT").is_some();
        Self::with_posixly_correct(prog, args, short, long, posixly_correct)
    }

    /// Like [`Getopt::new`] with `POSIXLY_CORRECT` given explicitly (for tests).
    pub fn with_posixly_correct(
        prog: &str,
        args: &'a [String],
        short: &'a str,
        long: &'a [LongOpt],
        posixly_correct: bool,
    ) -> Self {
        let (ordering, short) = if let Some(rest) = short.strip_prefix('-') {
            (Ordering::ReturnInOrder, rest)
        } else if let Some(rest) = short.strip_prefix('+') {
            (Ordering::RequireOrder, rest)
        } else if posixly_correct {
            (Ordering::RequireOrder, short)
        } else {
            (Ordering::Permute, short)
        };
        Self {
            prog: prog.to_string(),
            args,
            short,
            long,
            ordering,
            pos: 0,
            cluster: None,
            operands: Vec::new(),
            finished: false,
        }
    }

    /// The operands in the order getopt leaves them in argv after parsing: skipped
    /// operands first, then everything that was not examined (after `--`, after the first
    /// operand in require-order mode, or after an error).
    pub fn operands(&self) -> Vec<String> {
        let mut out = self.operands.clone();
        let mut rest = self.pos;
        if let Some((idx, _)) = self.cluster {
            rest = rest.max(idx + 1);
        }
        if rest < self.args.len() {
            out.extend(self.args[rest..].iter().cloned());
        }
        out
    }

    /// Consumes the next word if it satisfies `pred` (getopt callers do this by bumping
    /// `optind`; qemu-img `resize` takes `-1G` after the file name this way). Returns
    /// `None`, consuming nothing, inside a cluster of short options.
    pub fn take_next_if(&mut self, pred: impl Fn(&str) -> bool) -> Option<String> {
        if self.cluster.is_some() || self.finished {
            return None;
        }
        let word = self.args.get(self.pos)?;
        if pred(word) {
            self.pos += 1;
            Some(word.clone())
        } else {
            None
        }
    }

    fn err(&mut self, message: String) -> Option<Result<Item, GetoptError>> {
        // qemu-img exits on the first error, so parsing never resumes; stop here so that a
        // careless caller cannot loop forever either.
        self.finished = true;
        Some(Err(GetoptError { message }))
    }

    /// The next option (or, in return-in-order mode, operand); `None` at the end of the
    /// options. After an `Err` the parser is finished.
    pub fn next_item(&mut self) -> Option<Result<Item, GetoptError>> {
        if self.finished {
            return None;
        }
        if let Some((idx, off)) = self.cluster {
            return self.short_option(idx, off);
        }
        loop {
            let Some(word) = self.args.get(self.pos) else {
                self.finished = true;
                return None;
            };
            if word == "--" {
                self.pos += 1;
                self.finished = true;
                return None;
            }
            let is_operand = !word.starts_with('-') || word.len() == 1;
            if is_operand {
                match self.ordering {
                    Ordering::RequireOrder => {
                        self.finished = true;
                        return None;
                    }
                    Ordering::ReturnInOrder => {
                        self.pos += 1;
                        return Some(Ok(Item::Operand(word.clone())));
                    }
                    Ordering::Permute => {
                        self.operands.push(word.clone());
                        self.pos += 1;
                        continue;
                    }
                }
            }
            if let Some(body) = word.strip_prefix("--") {
                let idx = self.pos;
                self.pos += 1;
                return self.long_option(idx, body);
            }
            return self.short_option(self.pos, 1);
        }
    }

    fn short_option(&mut self, idx: usize, off: usize) -> Option<Result<Item, GetoptError>> {
        let word = &self.args[idx];
        let Some(c) = word[off..].chars().next() else {
            // Unreachable by construction (clusters end before the word does); be safe.
            self.cluster = None;
            self.pos = idx + 1;
            return self.next_item();
        };
        let next = off + c.len_utf8();
        let last_in_word = next >= word.len();
        if last_in_word {
            self.cluster = None;
            self.pos = idx + 1;
        } else {
            self.cluster = Some((idx, next));
        }
        let spec = if c == ':' || c == ';' {
            None
        } else {
            self.short.find(c)
        };
        let Some(at) = spec else {
            let msg = format!("{}: invalid option -- '{}'", self.prog, c);
            return self.err(msg);
        };
        let after = &self.short[at + c.len_utf8()..];
        if !after.starts_with(':') {
            return Some(Ok(Item::Opt(Key::Short(c), None)));
        }
        let optional = after.starts_with("::");
        if !last_in_word {
            // The rest of the word is the argument: `-ofoo`.
            let arg = word[next..].to_string();
            self.cluster = None;
            self.pos = idx + 1;
            return Some(Ok(Item::Opt(Key::Short(c), Some(arg))));
        }
        if optional {
            return Some(Ok(Item::Opt(Key::Short(c), None)));
        }
        match self.args.get(self.pos) {
            Some(arg) => {
                self.pos += 1;
                Some(Ok(Item::Opt(Key::Short(c), Some(arg.clone()))))
            }
            None => {
                let msg = format!("{}: option requires an argument -- '{}'", self.prog, c);
                self.err(msg)
            }
        }
    }

    fn long_option(&mut self, _idx: usize, body: &str) -> Option<Result<Item, GetoptError>> {
        let (name, value) = match body.find('=') {
            Some(eq) => (&body[..eq], Some(&body[eq + 1..])),
            None => (body, None),
        };
        let found = match self.long.iter().find(|o| o.name == name) {
            Some(exact) => *exact,
            None => {
                let mut candidates = self.long.iter().filter(|o| o.name.starts_with(name));
                let Some(first) = candidates.next().copied() else {
                    let msg = format!("{}: unrecognized option '--{}'", self.prog, body);
                    return self.err(msg);
                };
                // glibc only calls a prefix ambiguous when the matches would behave
                // differently; aliases of the first match are silently accepted.
                let differs = |o: &LongOpt| o.has_arg != first.has_arg || o.key != first.key;
                if candidates.clone().any(differs) {
                    let mut msg = format!(
                        "{}: option '--{}' is ambiguous; possibilities:",
                        self.prog, body
                    );
                    let mut first_listed = false;
                    for o in self.long.iter().filter(|o| o.name.starts_with(name)) {
                        let listed = if !first_listed && o.name == first.name {
                            first_listed = true;
                            true
                        } else {
                            differs(o)
                        };
                        if listed {
                            msg.push_str(&format!(" '--{}'", o.name));
                        }
                    }
                    return self.err(msg);
                }
                first
            }
        };
        match (found.has_arg, value) {
            (HasArg::No, Some(_)) => {
                let msg = format!(
                    "{}: option '--{}' doesn't allow an argument",
                    self.prog, found.name
                );
                self.err(msg)
            }
            (HasArg::No, None) | (HasArg::Optional, None) => Some(Ok(Item::Opt(found.key, None))),
            (_, Some(v)) => Some(Ok(Item::Opt(found.key, Some(v.to_string())))),
            (HasArg::Required, None) => match self.args.get(self.pos) {
                Some(arg) => {
                    self.pos += 1;
                    Some(Ok(Item::Opt(found.key, Some(arg.clone()))))
                }
                None => {
                    let msg = format!(
                        "{}: option '--{}' requires an argument",
                        self.prog, found.name
                    );
                    self.err(msg)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: &[LongOpt] = &[
        LongOpt::new("help", HasArg::No, Key::Short('h')),
        LongOpt::new("format", HasArg::Required, Key::Short('f')),
        LongOpt::new("force-share", HasArg::No, Key::Short('U')),
        LongOpt::new("output", HasArg::Required, Key::Long(1)),
        LongOpt::new("object", HasArg::Required, Key::Long(2)),
        LongOpt::new("backing", HasArg::Required, Key::Short('b')),
        LongOpt::new("backing-format", HasArg::Required, Key::Short('F')),
        LongOpt::new("a-format", HasArg::Required, Key::Short('f')),
        LongOpt::new("a-fmt", HasArg::Required, Key::Short('f')),
        LongOpt::new("tune", HasArg::Optional, Key::Long(3)),
    ];

    fn sv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn parse(short: &str, args: &[&str]) -> (Vec<Item>, Option<String>, Vec<String>) {
        let args = sv(args);
        let mut g = Getopt::with_posixly_correct("qemu-img info", &args, short, LONG, false);
        let mut items = Vec::new();
        let mut err = None;
        while let Some(r) = g.next_item() {
            match r {
                Ok(i) => items.push(i),
                Err(e) => err = Some(e.message),
            }
        }
        (items, err, g.operands())
    }

    fn o(c: char, a: Option<&str>) -> Item {
        Item::Opt(Key::Short(c), a.map(str::to_string))
    }

    #[test]
    fn short_forms() {
        let (items, err, ops) = parse("hf:qUo:", &["-qU", "-fraw", "-o", "a=b", "x"]);
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![
                o('q', None),
                o('U', None),
                o('f', Some("raw")),
                o('o', Some("a=b"))
            ]
        );
        assert_eq!(ops, sv(&["x"]));
        let (items, _, _) = parse("qf:", &["-qfraw"]);
        assert_eq!(items, vec![o('q', None), o('f', Some("raw"))]);
        let (items, _, _) = parse("qf:", &["-qf", "-q"]);
        assert_eq!(items, vec![o('q', None), o('f', Some("-q"))]);
    }

    #[test]
    fn permutation_and_double_dash() {
        let (items, err, ops) = parse("hf:", &["a", "-f", "raw", "b", "--", "-h", "c"]);
        assert_eq!(err, None);
        assert_eq!(items, vec![o('f', Some("raw"))]);
        assert_eq!(ops, sv(&["a", "b", "-h", "c"]));
        let (_, _, ops) = parse("h", &["-", "x"]);
        assert_eq!(ops, sv(&["-", "x"]));
    }

    #[test]
    fn require_order() {
        let (items, err, ops) = parse("+hV", &["-h", "info", "-V"]);
        assert_eq!(err, None);
        assert_eq!(items, vec![o('h', None)]);
        assert_eq!(ops, sv(&["info", "-V"]));
        let args = sv(&["x", "-h"]);
        let mut g = Getopt::with_posixly_correct("p", &args, "h", LONG, true);
        assert_eq!(g.next_item(), None);
        assert_eq!(g.operands(), sv(&["x", "-h"]));
    }

    #[test]
    fn return_in_order() {
        let (items, err, _) = parse("-hq", &["a", "-q", "b"]);
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![
                Item::Operand("a".into()),
                o('q', None),
                Item::Operand("b".into())
            ]
        );
    }

    #[test]
    fn errors_match_glibc() {
        let (_, err, _) = parse("hf:", &["-Z"]);
        assert_eq!(err.unwrap(), "qemu-img info: invalid option -- 'Z'");
        let (_, err, _) = parse(":hf:", &["-:"]);
        assert_eq!(err.unwrap(), "qemu-img info: invalid option -- ':'");
        let (_, err, _) = parse("hf:", &["x", "-f"]);
        assert_eq!(
            err.unwrap(),
            "qemu-img info: option requires an argument -- 'f'"
        );
        let (_, err, _) = parse("hf:", &["--bogus=3"]);
        assert_eq!(
            err.unwrap(),
            "qemu-img info: unrecognized option '--bogus=3'"
        );
        let (_, err, _) = parse("hf:", &["--output"]);
        assert_eq!(
            err.unwrap(),
            "qemu-img info: option '--output' requires an argument"
        );
        let (_, err, _) = parse("hf:", &["--he=1"]);
        assert_eq!(
            err.unwrap(),
            "qemu-img info: option '--help' doesn't allow an argument"
        );
        let (_, err, _) = parse("hf:", &["--o=json"]);
        assert_eq!(
            err.unwrap(),
            "qemu-img info: option '--o=json' is ambiguous; possibilities: '--output' '--object'"
        );
        let (_, err, _) = parse("hf:", &["--fo"]);
        assert_eq!(
            err.unwrap(),
            "qemu-img info: option '--fo' is ambiguous; possibilities: '--format' '--force-share'"
        );
    }

    #[test]
    fn long_forms() {
        let (items, err, ops) = parse(
            "hf:",
            &[
                "--outp=json",
                "x",
                "--format",
                "raw",
                "--backing",
                "b",
                "--tune",
                "--tune=v",
            ],
        );
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![
                Item::Opt(Key::Long(1), Some("json".into())),
                o('f', Some("raw")),
                o('b', Some("b")),
                Item::Opt(Key::Long(3), None),
                Item::Opt(Key::Long(3), Some("v".into())),
            ]
        );
        assert_eq!(ops, sv(&["x"]));
        // Exact name beats the longer entries that share its prefix.
        let (items, err, _) = parse("", &["--backing=x"]);
        assert_eq!(err, None);
        assert_eq!(items, vec![o('b', Some("x"))]);
        // Aliases with the same meaning are not ambiguous.
        let (items, err, _) = parse("", &["--a-f=raw"]);
        assert_eq!(err, None);
        assert_eq!(items, vec![o('f', Some("raw"))]);
        // Empty value after '=' is a value.
        let (items, _, _) = parse("", &["--format="]);
        assert_eq!(items, vec![o('f', Some(""))]);
    }

    #[test]
    fn no_panic_on_odd_input() {
        for args in [
            vec!["-"],
            vec!["--"],
            vec!["---"],
            vec!["--="],
            vec!["-é"],
            vec!["-fé"],
            vec!["--é=ü"],
            vec![""],
        ] {
            let _ = parse("hf:é", &args);
        }
        let (items, _, _) = parse("hf:é", &["-é"]);
        assert_eq!(items, vec![o('é', None)]);
    }
}
