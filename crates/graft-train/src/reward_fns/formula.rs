//! The arithmetic of a `multi` grader's `calculate_output`: numbers, sub-grader names,
//! `+ - * / ^`, parentheses, and the functions `min max abs floor ceil exp sqrt log` (natural
//! log), as OpenAI documents them. A small recursive-descent parser; nothing is evaluated as code.
//!
//! Precedence, loosest first: `+ -`, then `* /`, then unary `-`/`+`, then `^` (right-associative,
//! so `2^3^2` is `2^9` and `-2^2` is `-4`).

/// A function `calculate_output` may call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Func {
    /// The smallest argument.
    Min,
    /// The largest argument.
    Max,
    /// `|x|`.
    Abs,
    /// Rounded down.
    Floor,
    /// Rounded up.
    Ceil,
    /// `e^x`.
    Exp,
    /// The square root.
    Sqrt,
    /// The natural logarithm.
    Log,
}

impl Func {
    /// The function called `name`, if any.
    fn named(name: &str) -> Option<Func> {
        Some(match name {
            "min" => Func::Min,
            "max" => Func::Max,
            "abs" => Func::Abs,
            "floor" => Func::Floor,
            "ceil" => Func::Ceil,
            "exp" => Func::Exp,
            "sqrt" => Func::Sqrt,
            "log" => Func::Log,
            _ => return None,
        })
    }

    /// `min` and `max` take one or more arguments; the others exactly one.
    fn variadic(self) -> bool {
        matches!(self, Func::Min | Func::Max)
    }
}

/// A parsed formula.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// A number.
    Num(f64),
    /// A sub-grader's score, by name.
    Var(String),
    /// `-e`.
    Neg(Box<Expr>),
    /// `op` is one of `+ - * / ^`.
    Bin(char, Box<Expr>, Box<Expr>),
    /// A function of its arguments.
    Call(Func, Vec<Expr>),
}

impl Expr {
    /// The value with each name's value from `var` (every name was checked to exist beforehand;
    /// an unknown one is NaN). Division by zero and `log`/`sqrt` of negatives give non-finite
    /// values, which the caller reports.
    pub fn eval(&self, var: &dyn Fn(&str) -> Option<f64>) -> f64 {
        match self {
            Expr::Num(x) => *x,
            Expr::Var(n) => var(n).unwrap_or(f64::NAN),
            Expr::Neg(e) => -e.eval(var),
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval(var), b.eval(var));
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    '/' => a / b,
                    _ => a.powf(b),
                }
            }
            Expr::Call(f, args) => {
                let mut xs = args.iter().map(|e| e.eval(var));
                match f {
                    Func::Min => xs.fold(f64::INFINITY, f64::min),
                    Func::Max => xs.fold(f64::NEG_INFINITY, f64::max),
                    _ => {
                        let x = xs.next().unwrap_or(f64::NAN);
                        match f {
                            Func::Abs => x.abs(),
                            Func::Floor => x.floor(),
                            Func::Ceil => x.ceil(),
                            Func::Exp => x.exp(),
                            Func::Sqrt => x.sqrt(),
                            _ => x.ln(),
                        }
                    }
                }
            }
        }
    }

    /// Every name the formula reads, in order of appearance (repeats included).
    pub fn names(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_names(&mut out);
        out
    }

    fn collect_names<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::Num(_) => {}
            Expr::Var(n) => out.push(n),
            Expr::Neg(e) => e.collect_names(out),
            Expr::Bin(_, a, b) => {
                a.collect_names(out);
                b.collect_names(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.collect_names(out)),
        }
    }
}

/// Parses `src`; the error says what was expected and at which character (1-based).
pub fn parse(src: &str) -> Result<Expr, String> {
    let mut p = Parser {
        chars: src.chars().collect(),
        at: 0,
    };
    let e = p.expr()?;
    p.skip_space();
    if p.at < p.chars.len() {
        return Err(p.error("an operator or the end"));
    }
    Ok(e)
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn skip_space(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }

    /// The next character after spaces, not consumed.
    fn peek(&mut self) -> Option<char> {
        self.skip_space();
        self.chars.get(self.at).copied()
    }

    fn error(&self, expected: &str) -> String {
        match self.chars.get(self.at) {
            None => format!("expected {expected} at the end (character {})", self.at + 1),
            Some(c) => format!("expected {expected} at character {}, found `{c}`", self.at + 1),
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut e = self.term()?;
        while let Some(op @ ('+' | '-')) = self.peek() {
            self.at += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.term()?));
        }
        Ok(e)
    }

    fn term(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        while let Some(op @ ('*' | '/')) = self.peek() {
            self.at += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        match self.peek() {
            Some('-') => {
                self.at += 1;
                Ok(Expr::Neg(Box::new(self.unary()?)))
            }
            Some('+') => {
                self.at += 1;
                self.unary()
            }
            _ => self.power(),
        }
    }

    fn power(&mut self) -> Result<Expr, String> {
        let base = self.atom()?;
        if self.peek() == Some('^') {
            self.at += 1;
            return Ok(Expr::Bin('^', Box::new(base), Box::new(self.unary()?)));
        }
        Ok(base)
    }

    fn atom(&mut self) -> Result<Expr, String> {
        let Some(c) = self.peek() else {
            return Err(self.error("a number, a grader name or `(`"));
        };
        if c == '(' {
            self.at += 1;
            let e = self.expr()?;
            if self.peek() != Some(')') {
                return Err(self.error("`)`"));
            }
            self.at += 1;
            return Ok(e);
        }
        if c.is_ascii_digit() || c == '.' {
            return self.number();
        }
        if c.is_alphabetic() || c == '_' {
            let start = self.at;
            while self
                .chars
                .get(self.at)
                .is_some_and(|c| c.is_alphanumeric() || *c == '_')
            {
                self.at += 1;
            }
            let name: String = self.chars[start..self.at].iter().collect();
            if self.peek() != Some('(') {
                return Ok(Expr::Var(name));
            }
            let Some(f) = Func::named(&name) else {
                self.at = start;
                return Err(format!(
                    "unknown function `{name}` at character {} (known: min, max, abs, floor, ceil, exp, sqrt, log)",
                    start + 1
                ));
            };
            self.at += 1;
            let mut args = vec![self.expr()?];
            while self.peek() == Some(',') {
                self.at += 1;
                args.push(self.expr()?);
            }
            if self.peek() != Some(')') {
                return Err(self.error("`,` or `)`"));
            }
            self.at += 1;
            if !f.variadic() && args.len() != 1 {
                return Err(format!(
                    "`{name}` takes 1 argument, not {} (at character {})",
                    args.len(),
                    start + 1
                ));
            }
            return Ok(Expr::Call(f, args));
        }
        Err(self.error("a number, a grader name or `(`"))
    }

    fn number(&mut self) -> Result<Expr, String> {
        let start = self.at;
        let digits = |p: &mut Parser| {
            while p.chars.get(p.at).is_some_and(char::is_ascii_digit) {
                p.at += 1;
            }
        };
        digits(self);
        if self.chars.get(self.at) == Some(&'.') {
            self.at += 1;
            digits(self);
        }
        if matches!(self.chars.get(self.at), Some('e' | 'E')) {
            let mark = self.at;
            self.at += 1;
            if matches!(self.chars.get(self.at), Some('+' | '-')) {
                self.at += 1;
            }
            if self.chars.get(self.at).is_some_and(char::is_ascii_digit) {
                digits(self);
            } else {
                self.at = mark;
            }
        }
        let text: String = self.chars[start..self.at].iter().collect();
        text.parse().map(Expr::Num).map_err(|_| {
            self.at = start;
            self.error("a number")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(src: &str) -> f64 {
        let vars = |n: &str| match n {
            "a" => Some(0.5),
            "b_2" => Some(2.0),
            _ => None,
        };
        parse(src).unwrap_or_else(|e| panic!("{src}: {e}")).eval(&vars)
    }

    #[test]
    fn precedence_associativity_and_functions() {
        assert_eq!(value("1 + 2 * 3"), 7.0);
        assert_eq!(value("(1 + 2) * 3"), 9.0);
        assert_eq!(value("8 / 4 / 2"), 1.0);
        assert_eq!(value("10 - 4 - 3"), 3.0);
        assert_eq!(value("2 ^ 3 ^ 2"), 512.0);
        assert_eq!(value("-2 ^ 2"), -4.0);
        assert_eq!(value("2 ^ -1"), 0.5);
        assert_eq!(value("--a"), 0.5);
        assert_eq!(value("0.5 * a + 0.5 * b_2"), 1.25);
        assert_eq!(value("min(a, b_2, 3)"), 0.5);
        assert_eq!(value("max(a)"), 0.5);
        assert_eq!(value("abs(-3) + floor(1.7) + ceil(1.2)"), 6.0);
        assert!((value("exp(1)") - std::f64::consts::E).abs() < 1e-15);
        assert_eq!(value("sqrt(16) * log(1)"), 0.0);
        assert_eq!(value("1e-1 * 10 + .5"), 1.5);
        assert!(value("1 / 0").is_infinite());
        assert!(value("log(-1)").is_nan());
        assert_eq!(parse("a * (b_2 + a)").unwrap().names(), vec!["a", "b_2", "a"]);
    }

    #[test]
    fn errors_say_what_and_where() {
        for (src, want) in [
            (
                "",
                "expected a number, a grader name or `(` at the end (character 1)",
            ),
            (
                "1 +",
                "expected a number, a grader name or `(` at the end (character 4)",
            ),
            ("(a + 1", "expected `)` at the end (character 7)"),
            ("a b", "expected an operator or the end at character 3, found `b`"),
            (
                "a % 2",
                "expected an operator or the end at character 3, found `%`",
            ),
            (
                "pow(a, 2)",
                "unknown function `pow` at character 1 (known: min, max, abs, floor, ceil, exp, sqrt, log)",
            ),
            ("abs(a, 1)", "`abs` takes 1 argument, not 2 (at character 1)"),
            ("max(a; 1)", "expected `,` or `)` at character 6, found `;`"),
            (
                "1 * * 2",
                "expected a number, a grader name or `(` at character 5, found `*`",
            ),
            (
                "import os",
                "expected an operator or the end at character 8, found `o`",
            ),
        ] {
            assert_eq!(parse(src).unwrap_err(), want, "{src}");
        }
    }
}
