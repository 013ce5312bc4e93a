//! CEL whose comprehensions stop at a deadline.
//!
//! The `cel` crate has no cost limit and no way to interrupt an evaluation, and a comprehension
//! (`map`, `filter`, `all`, `exists`, `exists_one`; nested, over lists of up to the payload's size)
//! can run for minutes. A timeout around the evaluation only stops waiting for it; the work goes on,
//! holding a thread. So mend expands the comprehension macros itself, into the same comprehensions
//! as the standard ones, with a call of [`TICK`] in each iteration. [`TICK`] passes its boolean
//! through until the deadline of the evaluation running on this thread ([`Deadline`]) has passed,
//! then fails, and the failure ends the evaluation at once:
//! - `map` and `filter` keep their loop condition a literal and their step's shape
//!   (`cond ? @result + [x] : @result`), which the interpreter runs in place in linear time; the
//!   check is that condition (`map(x, f)` becomes the guarded form with an always-true guard).
//! - `all`, `exists` and `exists_one` check in their loop condition: an error in the step of an
//!   `&&`/`||` fold is deferred and the loop would go on, while one in the condition stops it.
//!
//! `has` is expanded as the standard one is (the standard macros come as a set).

use std::cell::Cell;
use std::time::{Duration, Instant};

use cel::common::ast::{
    CallExpr, ComprehensionExpr, Expr, IdedExpr, ListExpr, LiteralValue, operators,
};
use cel::parser::{Macro, MacroExprHelper, ParseError};
use cel::{Env, ExecutionError, FunctionContext, ParseErrors, Program};

/// The function each iteration of a comprehension calls (a name no rule can declare: rules' names
/// start with a letter, and this one is registered by mend only).
pub const TICK: &str = "__mend_tick";

thread_local! {
    /// The deadline of the evaluation running on this thread, if it has one.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// mend's environment for compiling rules: the standard library and mend's macros.
    static ENV: Env = environment();
}

/// The deadline of the evaluations on this thread while it lives; the one before is restored when
/// it is dropped (a panic included).
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// Evaluations on this thread stop once `limit` (from now) has passed; `None`: no limit.
    pub fn set(limit: Option<Duration>) -> Deadline {
        let at = limit.map(|l| Instant::now() + l);
        Deadline(DEADLINE.with(|d| d.replace(at)))
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.0));
    }
}

/// Compiles `source` with mend's comprehension macros.
pub fn compile(source: &str) -> Result<Program, ParseErrors> {
    ENV.with(|env| env.compile(source))
}

/// The message that stopped evaluation's error gives: the deadline in words, without the
/// function's internal name; any other error as it is.
pub fn describe(e: &ExecutionError) -> String {
    match e {
        ExecutionError::FunctionError { function, message } if function.as_str() == TICK => {
            message.clone()
        }
        other => other.to_string(),
    }
}

/// [`TICK`]: `x` while the deadline has not passed.
pub fn tick(ftx: &FunctionContext, x: bool) -> Result<bool, ExecutionError> {
    match DEADLINE.with(Cell::get) {
        Some(at) if Instant::now() >= at => Err(ftx.error(
            "rule evaluation took longer than its time limit (stopped inside a comprehension)",
        )),
        _ => Ok(x),
    }
}

fn environment() -> Env {
    // As `Program::compile` parses: without the optional syntax (`a.?b`, `[?a]`), which rules
    // never accepted (the optional functions stay, as in the evaluation context).
    let mut env = Env::default().with_stdlib().with_optional_support(false);
    let macros = [
        Macro::global(operators::HAS, 1, has),
        Macro::receiver(operators::ALL, 2, all),
        Macro::receiver(operators::EXISTS, 2, exists),
        Macro::receiver(operators::EXISTS_ONE, 2, exists_one),
        Macro::receiver("existsOne", 2, exists_one),
        Macro::receiver(operators::MAP, 2, map),
        Macro::receiver(operators::MAP, 3, map),
        Macro::receiver(operators::FILTER, 2, filter),
    ];
    for m in macros {
        // Proven infallible: an environment without macros refuses none of these distinct ones.
        let _ = env.add_macro(m);
    }
    env
}

type Args<'a> = (&'a mut Option<IdedExpr>, &'a mut Vec<IdedExpr>);

const ACCU: &str = "@result";

fn call(h: &mut MacroExprHelper<'_>, func: &str, args: Vec<IdedExpr>) -> IdedExpr {
    h.next_expr(Expr::Call(CallExpr {
        func_name: func.to_owned(),
        target: None,
        args,
    }))
}

fn ident(h: &mut MacroExprHelper<'_>, name: &str) -> IdedExpr {
    h.next_expr(Expr::Ident(name.to_owned()))
}

fn boolean(h: &mut MacroExprHelper<'_>, b: bool) -> IdedExpr {
    h.next_expr(Expr::Literal(LiteralValue::Boolean(b.into())))
}

/// `__mend_tick(x)`.
fn ticked(h: &mut MacroExprHelper<'_>, x: IdedExpr) -> IdedExpr {
    call(h, TICK, vec![x])
}

/// The iteration variable named by the first argument.
fn variable(h: &mut MacroExprHelper<'_>, e: IdedExpr) -> Result<String, ParseError> {
    match e.expr {
        Expr::Ident(name) => Ok(name),
        _ => Err(h.new_error(e.id, "argument must be a simple name")),
    }
}

/// The parts every comprehension macro takes: its range (the target) and its variable.
fn range_and_variable(
    h: &mut MacroExprHelper<'_>,
    (target, args): Args<'_>,
) -> Result<(IdedExpr, String), ParseError> {
    let range = target
        .take()
        .ok_or_else(|| h.new_error(0, "a comprehension needs a list or map to run over"))?;
    if args.is_empty() {
        return Err(h.new_error(range.id, "a comprehension needs a variable"));
    }
    let var = variable(h, args.remove(0))?;
    Ok((range, var))
}

fn comprehension(
    h: &mut MacroExprHelper<'_>,
    range: IdedExpr,
    var: String,
    init: IdedExpr,
    cond: IdedExpr,
    step: IdedExpr,
    result: IdedExpr,
) -> IdedExpr {
    h.next_expr(Expr::Comprehension(Box::new(ComprehensionExpr {
        iter_range: range,
        iter_var: var,
        iter_var2: None,
        accu_var: ACCU.to_owned(),
        accu_init: init,
        loop_cond: cond,
        loop_step: step,
        result,
    })))
}

fn has(
    h: &mut MacroExprHelper<'_>,
    _target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError> {
    let Some(arg) = args.pop() else {
        return Err(h.new_error(0, "has() takes one argument"));
    };
    match arg.expr {
        Expr::Select(mut select) => {
            select.test = true;
            Ok(Some(h.next_expr(Expr::Select(select))))
        }
        _ => Err(h.new_error(arg.id, "invalid argument to has() macro")),
    }
}

/// `range.all(x, p)`: `@result && p` while `@result` is not false.
fn all(
    h: &mut MacroExprHelper<'_>,
    target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError> {
    fold(h, (target, args), true)
}

/// `range.exists(x, p)`: `@result || p` while `@result` is not true.
fn exists(
    h: &mut MacroExprHelper<'_>,
    target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError> {
    fold(h, (target, args), false)
}

/// `all` (`every`) or `exists`: `@result && p` from true while `@result` is not false, or
/// `@result || p` from false while it is not true.
fn fold(
    h: &mut MacroExprHelper<'_>,
    (target, args): Args<'_>,
    every: bool,
) -> Result<Option<IdedExpr>, ParseError> {
    let (range, var) = range_and_variable(h, (target, args))?;
    let p = args
        .pop()
        .ok_or_else(|| h.new_error(range.id, "a comprehension needs a predicate"))?;
    let init = boolean(h, every);
    let mut accu = ident(h, ACCU);
    if !every {
        accu = call(h, operators::LOGICAL_NOT, vec![accu]);
    }
    let going = call(h, operators::NOT_STRICTLY_FALSE, vec![accu]);
    let cond = ticked(h, going);
    let accu = ident(h, ACCU);
    let op = if every {
        operators::LOGICAL_AND
    } else {
        operators::LOGICAL_OR
    };
    let step = call(h, op, vec![accu, p]);
    let result = ident(h, ACCU);
    Ok(Some(comprehension(h, range, var, init, cond, step, result)))
}

/// `range.exists_one(x, p)`: counts the elements for which `p` holds; true when one does.
fn exists_one(
    h: &mut MacroExprHelper<'_>,
    target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError> {
    let (range, var) = range_and_variable(h, (target, args))?;
    let p = args
        .pop()
        .ok_or_else(|| h.new_error(range.id, "exists_one() needs a predicate"))?;
    let init = int(h, 0);
    let always = boolean(h, true);
    let cond = ticked(h, always);
    let accu = ident(h, ACCU);
    let one = int(h, 1);
    let plus = call(h, operators::ADD, vec![accu, one]);
    let accu = ident(h, ACCU);
    let step = call(h, operators::CONDITIONAL, vec![p, plus, accu]);
    let accu = ident(h, ACCU);
    let one = int(h, 1);
    let result = call(h, operators::EQUALS, vec![accu, one]);
    Ok(Some(comprehension(h, range, var, init, cond, step, result)))
}

fn int(h: &mut MacroExprHelper<'_>, n: i64) -> IdedExpr {
    h.next_expr(Expr::Literal(LiteralValue::Int(n.into())))
}

/// The list of `item` for every element where `guard` holds (`map` and `filter`): from `[]`, step
/// `guard ? @result + [item] : @result`, the shape the interpreter appends in place.
fn collect(
    h: &mut MacroExprHelper<'_>,
    (range, var): (IdedExpr, String),
    guard: IdedExpr,
    item: IdedExpr,
) -> IdedExpr {
    let guard = ticked(h, guard);
    let init = h.next_expr(Expr::List(ListExpr::new(Vec::new())));
    let cond = boolean(h, true);
    let accu = ident(h, ACCU);
    let list = h.next_expr(Expr::List(ListExpr::new(vec![item])));
    let plus = call(h, operators::ADD, vec![accu, list]);
    let accu = ident(h, ACCU);
    let step = call(h, operators::CONDITIONAL, vec![guard, plus, accu]);
    let result = ident(h, ACCU);
    comprehension(h, range, var, init, cond, step, result)
}

/// `range.map(x, f)` and `range.map(x, p, f)`.
fn map(
    h: &mut MacroExprHelper<'_>,
    target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError> {
    let (range, var) = range_and_variable(h, (target, args))?;
    let f = args
        .pop()
        .ok_or_else(|| h.new_error(range.id, "map() needs a function"))?;
    let guard = match args.pop() {
        Some(p) => p,
        None => boolean(h, true),
    };
    Ok(Some(collect(h, (range, var), guard, f)))
}

/// `range.filter(x, p)`.
fn filter(
    h: &mut MacroExprHelper<'_>,
    target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError> {
    let (range, var) = range_and_variable(h, (target, args))?;
    let p = args
        .pop()
        .ok_or_else(|| h.new_error(range.id, "filter() needs a predicate"))?;
    let item = ident(h, &var);
    Ok(Some(collect(h, (range, var), p, item)))
}
