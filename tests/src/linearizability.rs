//! A linearizability checker for histories of a key → value map: the Wing &
//! Gong search with Lowe's memoization (the algorithm of Knossos and
//! Porcupine), partitioned per key.
//!
//! A history is what clients saw: each operation's invoke and return time
//! (monotonic nanoseconds) and its kind, a write of a value or a read that
//! returned a value (or nothing, for a key never written). A write whose
//! outcome the client does not know — it errored or timed out — may or may
//! not have taken effect: it is an *unknown* operation, returning at +∞,
//! which the search may linearize anywhere after its invocation or leave
//! out (Jepsen's `:info`). A read that failed tells nothing and is not
//! recorded.
//!
//! A map is linearizable iff each key's register is (linearizability is
//! local, Herlihy & Wing 1990), so every key is checked on its own; that is
//! what keeps the search small.

use std::collections::{BTreeMap, HashMap, HashSet};

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// A write of this value.
    Write(String),
    /// A read that returned this value (`None`: the key was absent).
    Read(Option<String>),
}

/// One client operation on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Which client issued it (for reports only).
    pub client: usize,
    /// The key.
    pub key: String,
    /// What it did.
    pub kind: OpKind,
    /// When it was invoked (monotonic nanoseconds).
    pub invoke: u64,
    /// When it returned; `None` for a write whose outcome is unknown.
    pub ret: Option<u64>,
}

/// Why a history is not (or could not be shown to be) linearizable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// No order of the key's operations explains what the clients saw.
    #[error(
        "history of key {key:?} is not linearizable ({ops} operations); around the first \
         operation no order could place:\n{excerpt}"
    )]
    NotLinearizable {
        /// The key.
        key: String,
        /// How many operations it had.
        ops: usize,
        /// The operations concurrent with, or next to, the one that could
        /// not be placed, one a line.
        excerpt: String,
    },
    /// The search gave up before it could decide.
    #[error("history of key {key:?} too large to check: gave up after {steps} search steps")]
    TooLarge {
        /// The key.
        key: String,
        /// Steps taken.
        steps: u64,
    },
    /// An operation returned before it was invoked.
    #[error(
        "operation of client {client} on key {key:?} returns at {ret} before its invoke at {invoke}"
    )]
    BadTimes {
        /// The client.
        client: usize,
        /// The key.
        key: String,
        /// Its invoke time.
        invoke: u64,
        /// Its return time.
        ret: u64,
    },
}

/// Search steps allowed per key before [`CheckError::TooLarge`]: bounds the
/// time a pathological history can take (each step is a few hash look-ups).
pub const MAX_STEPS_PER_KEY: u64 = 20_000_000;

/// Checks a whole history: every key's operations must be linearizable
/// against a register that starts absent.
pub fn check(history: &[Op]) -> Result<(), CheckError> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        if let Some(ret) = op.ret
            && ret < op.invoke
        {
            return Err(CheckError::BadTimes {
                client: op.client,
                key: op.key.clone(),
                invoke: op.invoke,
                ret,
            });
        }
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        check_key(key, &ops, MAX_STEPS_PER_KEY)?;
    }
    Ok(())
}

/// One entry of the time-ordered list of calls and returns.
#[derive(Debug, Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

/// The register's value: an interned value id, `None` for absent.
type State = Option<u32>;

/// What an operation does to the register, with values interned.
#[derive(Debug, Clone, Copy)]
enum Step {
    Write(u32),
    Read(Option<u32>),
}

/// WGL on one key. The entries form a doubly linked list (index 0 is the
/// head sentinel) so that linearized operations are lifted out and put back
/// in O(1); the cache holds (linearized set, state) pairs already explored.
fn check_key(key: &str, all: &[&Op], max_steps: u64) -> Result<(), CheckError> {
    // An unknown write whose value no read returned can always be left out
    // (in any order that has it, nothing observes it), so it is; the others
    // matter only until their value's last read returns: placed after that,
    // nobody could see them, so there they are left out too. This keeps the
    // search from trying every subset of pending unknown writes.
    let read_values: HashMap<&str, u64> = all.iter().fold(HashMap::new(), |mut last, op| {
        if let (OpKind::Read(Some(v)), Some(ret)) = (&op.kind, op.ret) {
            let e = last.entry(v.as_str()).or_insert(ret);
            *e = (*e).max(ret);
        }
        last
    });
    let ops: Vec<&Op> = all
        .iter()
        .copied()
        .filter(|op| match (&op.kind, op.ret) {
            (OpKind::Write(v), None) => read_values.contains_key(v.as_str()),
            _ => true,
        })
        .collect();
    let ops = ops.as_slice();
    // When each operation must be placed by: its return, or for an unknown
    // write the last return of a read of its value.
    let deadline: Vec<u64> = ops
        .iter()
        .map(|op| match (&op.kind, op.ret) {
            (_, Some(ret)) => ret,
            (OpKind::Write(v), None) => read_values[v.as_str()].max(op.invoke),
            (OpKind::Read(_), None) => op.invoke,
        })
        .collect();

    let mut values: HashMap<String, u32> = HashMap::new();
    let mut intern = |v: &String| {
        let n = values.len() as u32;
        *values.entry(v.clone()).or_insert(n)
    };
    let steps: Vec<Step> = ops
        .iter()
        .map(|op| match &op.kind {
            OpKind::Write(v) => Step::Write(intern(v)),
            OpKind::Read(v) => Step::Read(v.as_ref().map(&mut intern)),
        })
        .collect();
    // A read of a value nobody wrote can never be explained; the search
    // finds that too, but only after exploring every order.
    let written: HashSet<u32> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Write(v) => Some(*v),
            Step::Read(_) => None,
        })
        .collect();
    if let Some(i) = steps
        .iter()
        .position(|s| matches!(s, Step::Read(Some(v)) if !written.contains(v)))
    {
        return Err(not_linearizable(key, ops, i));
    }

    // Calls and returns in time order; at equal times calls first, so that
    // operations that merely touch count as concurrent (the lenient choice).
    let mut events: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke, 0, i, true));
        events.push((deadline[i], 1, i, false));
    }
    events.sort_unstable();
    // Entry 0 is the head sentinel; entries 1..=2n follow in time order.
    let mut list = Vec::with_capacity(events.len() + 1);
    list.push(Entry {
        op: usize::MAX,
        is_call: false,
        prev: 0,
        next: 1,
    });
    let mut call_entry = vec![0; ops.len()];
    let mut ret_entry = vec![0; ops.len()];
    for (pos, &(_, _, op, is_call)) in events.iter().enumerate() {
        let idx = pos + 1;
        list.push(Entry {
            op,
            is_call,
            prev: idx - 1,
            next: idx + 1,
        });
        if is_call {
            call_entry[op] = idx;
        } else {
            ret_entry[op] = idx;
        }
    }
    let end = list.len(); // one past the last entry: the list's end
    let lift = |list: &mut Vec<Entry>, e: usize| {
        let (p, n) = (list[e].prev, list[e].next);
        list[p].next = n;
        if n != end {
            list[n].prev = p;
        }
    };
    let unlift = |list: &mut Vec<Entry>, e: usize| {
        let (p, n) = (list[e].prev, list[e].next);
        list[p].next = e;
        if n != end {
            list[n].prev = e;
        }
    };

    // `resolved`: operations placed, or (unknown writes) left out; with the
    // register's state it determines everything the search can still do,
    // so it is the memo key.
    let words = ops.len().div_ceil(64);
    let mut resolved = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut entry = list[0].next;
    // The unplaced operation met at the deepest point of the search, for
    // the report.
    let mut stuck_at = 0usize;
    let mut deepest = 0usize;
    let mut taken = 0u64;
    loop {
        taken += 1;
        if taken > max_steps {
            return Err(CheckError::TooLarge {
                key: key.to_string(),
                steps: taken,
            });
        }
        if entry == end {
            // Every entry lifted: all operations resolved.
            return Ok(());
        }
        let e = list[entry];
        let op = e.op;
        // The state after resolving `op` now, if that is possible.
        let next_state = if e.is_call {
            match steps[op] {
                Step::Write(v) => Some(Some(v)),
                Step::Read(v) if v == state => Some(state),
                Step::Read(_) => None,
            }
        } else if ops[op].ret.is_none() {
            // An unknown write at its deadline: leave it out.
            Some(state)
        } else {
            None
        };
        if let Some(next_state) = next_state {
            resolved[op / 64] |= 1 << (op % 64);
            if cache.insert((resolved.clone(), next_state)) {
                stack.push((op, state));
                state = next_state;
                lift(&mut list, call_entry[op]);
                lift(&mut list, ret_entry[op]);
                entry = list[0].next;
                continue;
            }
            resolved[op / 64] &= !(1 << (op % 64));
        }
        if e.is_call {
            entry = e.next;
            continue;
        }
        // A return whose operation cannot be resolved here: undo the last
        // choice and try the next one.
        if stack.len() >= deepest {
            deepest = stack.len();
            stuck_at = op;
        }
        let Some((undo, prev_state)) = stack.pop() else {
            return Err(not_linearizable(key, ops, stuck_at));
        };
        state = prev_state;
        resolved[undo / 64] &= !(1 << (undo % 64));
        unlift(&mut list, ret_entry[undo]);
        unlift(&mut list, call_entry[undo]);
        entry = list[call_entry[undo]].next;
    }
}

fn not_linearizable(key: &str, ops: &[&Op], at: usize) -> CheckError {
    let focus = ops[at];
    let focus_end = focus.ret.unwrap_or(u64::MAX);
    // The operations overlapping the focus, plus a little before it.
    let from = focus.invoke.saturating_sub(50_000_000);
    let mut near: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.invoke <= focus_end && o.ret.unwrap_or(u64::MAX) >= from)
        .collect();
    near.sort_by_key(|o| o.invoke);
    let base = near.first().map_or(0, |o| o.invoke);
    let mut lines: Vec<String> = near
        .iter()
        .take(40)
        .map(|o| {
            let what = match &o.kind {
                OpKind::Write(v) => format!("write {}", short(v)),
                OpKind::Read(Some(v)) => format!("read -> {}", short(v)),
                OpKind::Read(None) => "read -> (absent)".to_string(),
            };
            let ret = match o.ret {
                Some(r) => format!("{:.3} ms", (r - base) as f64 / 1e6),
                None => "unknown".to_string(),
            };
            let mark = if std::ptr::eq(*o, focus) { "  <==" } else { "" };
            format!(
                "  client {:>3} [{:.3} ms .. {ret}] {what}{mark}",
                o.client,
                (o.invoke - base) as f64 / 1e6
            )
        })
        .collect();
    if near.len() > 40 {
        lines.push(format!("  ... and {} more", near.len() - 40));
    }
    CheckError::NotLinearizable {
        key: key.to_string(),
        ops: ops.len(),
        excerpt: lines.join("\n"),
    }
}

fn short(v: &str) -> String {
    if v.len() <= 24 {
        v.to_string()
    } else {
        let cut = (0..=24).rev().find(|&i| v.is_char_boundary(i)).unwrap_or(0);
        format!("{}…({} bytes)", &v[..cut], v.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(client: usize, key: &str, v: &str, invoke: u64, ret: u64) -> Op {
        Op {
            client,
            key: key.into(),
            kind: OpKind::Write(v.into()),
            invoke,
            ret: Some(ret),
        }
    }
    fn unknown_w(client: usize, key: &str, v: &str, invoke: u64) -> Op {
        Op {
            ret: None,
            ..w(client, key, v, invoke, invoke)
        }
    }
    fn r(client: usize, key: &str, v: Option<&str>, invoke: u64, ret: u64) -> Op {
        Op {
            client,
            key: key.into(),
            kind: OpKind::Read(v.map(String::from)),
            invoke,
            ret: Some(ret),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            r(0, "a", None, 0, 1),
            w(0, "a", "1", 2, 3),
            r(1, "a", Some("1"), 4, 5),
            w(1, "a", "2", 6, 7),
            r(0, "a", Some("2"), 8, 9),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn concurrent_write_may_be_seen_or_not() {
        // The write overlaps both reads: old then new is fine.
        let h = vec![
            w(0, "a", "1", 0, 1),
            w(1, "a", "2", 10, 100),
            r(2, "a", Some("1"), 20, 30),
            r(2, "a", Some("2"), 40, 50),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn stale_read_is_caught() {
        // The read starts after the write of 2 returned, yet sees 1.
        let h = vec![
            w(0, "a", "1", 0, 1),
            w(0, "a", "2", 2, 3),
            r(1, "a", Some("1"), 4, 5),
        ];
        let err = check(&h).unwrap_err();
        assert!(
            matches!(err, CheckError::NotLinearizable { ref key, .. } if key == "a"),
            "{err}"
        );
    }

    #[test]
    fn new_then_old_across_concurrent_readers_is_caught() {
        // Once one read returned the new value, a later read may not return
        // the old one, even while the write is still in flight.
        let h = vec![
            w(0, "a", "1", 0, 1),
            w(1, "a", "2", 10, 100),
            r(2, "a", Some("2"), 20, 30),
            r(3, "a", Some("1"), 40, 50),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn lost_write_is_caught() {
        // An acknowledged write, then a read that never sees it.
        let h = vec![w(0, "a", "1", 0, 1), r(1, "a", None, 5, 6)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn reordered_writes_are_caught() {
        // 1 then 2 were acknowledged in order, but 1 is what remains.
        let h = vec![
            w(0, "a", "1", 0, 1),
            w(0, "a", "2", 2, 3),
            r(1, "a", Some("2"), 4, 5),
            r(1, "a", Some("1"), 6, 7),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn read_of_a_value_never_written_is_caught() {
        let h = vec![w(0, "a", "1", 0, 1), r(1, "a", Some("x"), 2, 3)];
        let err = check(&h).unwrap_err();
        assert!(err.to_string().contains("read -> x"), "{err}");
    }

    #[test]
    fn unknown_write_may_take_effect_late_or_never() {
        // Taken effect, long after the client gave up on it.
        let late = vec![
            w(0, "a", "1", 0, 1),
            unknown_w(1, "a", "2", 2),
            r(2, "a", Some("1"), 100, 101),
            r(2, "a", Some("2"), 200, 201),
        ];
        assert_eq!(check(&late), Ok(()));
        // Never taken effect.
        let never = vec![
            w(0, "a", "1", 0, 1),
            unknown_w(1, "a", "2", 2),
            r(2, "a", Some("1"), 200, 201),
        ];
        assert_eq!(check(&never), Ok(()));
        // But not before it was invoked.
        let early = vec![r(2, "a", Some("2"), 0, 1), unknown_w(1, "a", "2", 2)];
        assert!(check(&early).is_err());
        // And once seen, it cannot be undone by nothing.
        let flicker = vec![
            w(0, "a", "1", 0, 1),
            unknown_w(1, "a", "2", 2),
            r(2, "a", Some("2"), 10, 11),
            r(2, "a", Some("1"), 20, 21),
        ];
        assert!(check(&flicker).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let h = vec![
            w(0, "a", "1", 0, 10),
            w(1, "b", "1", 0, 10),
            r(2, "a", Some("1"), 20, 21),
            r(2, "b", None, 22, 23),
        ];
        let err = check(&h).unwrap_err();
        assert!(
            matches!(err, CheckError::NotLinearizable { ref key, .. } if key == "b"),
            "{err}"
        );
    }

    #[test]
    fn bad_times_are_reported() {
        let h = vec![w(3, "a", "1", 10, 5)];
        assert!(matches!(
            check(&h),
            Err(CheckError::BadTimes { client: 3, .. })
        ));
    }

    #[test]
    fn many_concurrent_clients_check_quickly() {
        // 8 sequential clients, 2,000 operations on one key, every one
        // overlapping others, linearizable by construction: each takes
        // effect at a random point inside its interval and reads return
        // what the points' order says; a tenth of the writes are unknown.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut planned = Vec::new(); // (point, is_write, unknown, op)
        for client in 0..8usize {
            let mut cursor = 0u64;
            for i in 0..250u64 {
                let invoke = cursor + rand() % 10;
                let ret = invoke + 1 + rand() % 60;
                cursor = ret;
                let point = invoke + rand() % (ret - invoke + 1);
                let is_write = rand() % 3 == 0;
                let unknown = is_write && rand() % 10 == 0;
                let v = format!("c{client}-{i}");
                let op = if is_write {
                    w(client, "k", &v, invoke, ret)
                } else {
                    r(client, "k", None, invoke, ret)
                };
                planned.push((point, planned.len(), unknown, op));
            }
        }
        planned.sort_by_key(|p| (p.0, p.1));
        let mut value = None::<String>;
        let mut h = Vec::new();
        for (_, _, unknown, mut op) in planned {
            match &op.kind {
                OpKind::Write(v) => value = Some(v.clone()),
                OpKind::Read(_) => op.kind = OpKind::Read(value.clone()),
            }
            if unknown {
                op.ret = None;
            }
            h.push(op);
        }
        let start = std::time::Instant::now();
        assert_eq!(check(&h), Ok(()));
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        // And one stale read breaks it: a read, after everything, of the
        // first value written.
        let first = h
            .iter()
            .find_map(|o| match (&o.kind, o.ret) {
                (OpKind::Write(v), Some(_)) => Some(v.clone()),
                _ => None,
            })
            .unwrap();
        h.push(r(9, "k", Some(&first), 1_000_000, 1_000_001));
        assert!(check(&h).is_err());
    }

    #[test]
    fn step_limit_bounds_the_search() {
        let ops: Vec<Op> = (0..20)
            .map(|i| w(i, "a", &format!("{i}"), 0, 100))
            .chain([r(99, "a", None, 200, 201)])
            .collect();
        let refs: Vec<&Op> = ops.iter().collect();
        assert!(matches!(
            check_key("a", &refs, 1_000),
            Err(CheckError::TooLarge { .. })
        ));
    }
}
