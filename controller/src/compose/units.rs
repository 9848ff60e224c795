//! Units that Compose files write as strings: durations (`1m30s`), byte sizes
//! (`512M`, `1g`) and CPU counts (`"0.5"`).
//!
//! Each parsed value keeps an exact integer form (nanoseconds, bytes,
//! nano-CPUs) so that comparing two stacks never depends on float rounding,
//! and prints back in a form the parser reads again (normalizing is
//! idempotent).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a unit value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// A duration that is not Go's `ParseDuration` syntax (`1m30s`, `500ms`).
    #[error("invalid duration `{value}`: {reason}")]
    Duration {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A byte size that is not a number with an optional `b|k|m|g|t` unit.
    #[error("invalid size `{value}`: {reason}")]
    Size {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A CPU count that is not a positive decimal number.
    #[error("invalid cpus `{value}`: {reason}")]
    Cpus {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A duration as Compose writes it; printed Go-style (`1m30s`, `0s`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Builds a duration from whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    /// Parses Go's duration syntax, which Compose uses: a sequence of decimal
    /// numbers each with a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`).
    /// A bare `0` is accepted as Go does; negative durations are refused
    /// because no Compose field means anything by them.
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let err = |reason| UnitError::Duration {
            value: text.to_string(),
            reason,
        };
        let s = text.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.starts_with('-') {
            return Err(err("negative"));
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        if s == "0" {
            return Ok(Self::default());
        }
        let mut total: u128 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| err("missing unit"))?;
            if num_len == 0 {
                return Err(err("expected a number"));
            }
            let number = &rest[..num_len];
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let scale: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(err("unknown unit (use ns, us, ms, s, m or h)")),
            };
            total += decimal_scaled(number, scale).ok_or_else(|| err("bad number"))?;
        }
        let nanos = u64::try_from(total).map_err(|_| err("too large"))?;
        Ok(Self(std::time::Duration::from_nanos(nanos)))
    }
}

impl fmt::Display for Duration {
    /// Prints as a sequence of units, largest first (`1h2m3s500ms`), which
    /// Go's `ParseDuration` and [`Duration::parse`] both read back exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        for (unit, scale) in [
            ("h", 3_600_000_000_000u128),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
            ("ns", 1),
        ] {
            if nanos >= scale {
                write!(f, "{}{unit}", nanos / scale)?;
                nanos %= scale;
            }
        }
        Ok(())
    }
}

impl From<Duration> for String {
    fn from(d: Duration) -> Self {
        d.to_string()
    }
}

impl TryFrom<String> for Duration {
    type Error = UnitError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

/// A byte count. Serialized as a plain integer, which Compose accepts for
/// every size field and which scripts read without a unit table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    /// Parses a size as Docker's `RAMInBytes` does: a decimal number and an
    /// optional case-insensitive unit `b`, `k`/`kb`, `m`/`mb`, `g`/`gb`,
    /// `t`/`tb`, all powers of 1024 (`512M` is 512 MiB, as in Docker).
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let err = |reason| UnitError::Size {
            value: text.to_string(),
            reason,
        };
        let s = text.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        if number.is_empty() {
            return Err(err("expected a number"));
        }
        let scale: u128 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(err("unknown unit (use b, k, m, g or t)")),
        };
        let total = decimal_scaled(number, scale).ok_or_else(|| err("bad number"))?;
        u64::try_from(total)
            .map(Bytes)
            .map_err(|_| err("too large"))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A CPU count, kept as nano-CPUs (Swarm's `NanoCPUs`) so that `0.5` and
/// `"0.50"` compare equal. Serialized as a number (`0.5`), as
/// `docker compose config` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cpus(pub u64);

impl Cpus {
    /// Parses a positive decimal number of CPUs with at most nine decimals.
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let err = |reason| UnitError::Cpus {
            value: text.to_string(),
            reason,
        };
        let s = text.trim();
        if s.starts_with('-') {
            return Err(err("negative"));
        }
        let nanos = decimal_scaled(s, 1_000_000_000).ok_or_else(|| err("not a decimal number"))?;
        if nanos == 0 {
            return Err(err("must be greater than 0"));
        }
        u64::try_from(nanos).map(Cpus).map_err(|_| err("too large"))
    }
}

impl fmt::Display for Cpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1_000_000_000;
        let frac = self.0 % 1_000_000_000;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl Serialize for Cpus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Whole/fraction splits with nine decimals print exactly as f64 for
        // any count a machine can have, and `parse` reads them back exactly.
        let value: f64 = self
            .to_string()
            .parse()
            .map_err(serde::ser::Error::custom)?;
        s.serialize_f64(value)
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        Cpus::parse(&value.to_string()).map_err(serde::de::Error::custom)
    }
}

/// Multiplies a non-negative decimal literal (`1.5`) by `scale` exactly,
/// truncating below one unit of `scale`. `None` for anything else.
fn decimal_scaled(number: &str, scale: u128) -> Option<u128> {
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    // Beyond 18 decimals nothing is left at nanosecond or byte scale.
    let frac = &frac[..frac.len().min(18)];
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let frac_scaled = frac_value.checked_mul(scale)? / 10u128.pow(frac.len() as u32);
    let total = whole.checked_mul(scale)?.checked_add(frac_scaled)?;
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, nanos) in [
            ("1m30s", 90_000_000_000u64),
            ("5s", 5_000_000_000),
            ("0", 0),
            ("0s", 0),
            ("1.5s", 1_500_000_000),
            ("500ms", 500_000_000),
            ("1h", 3_600_000_000_000),
            ("2h45m", 9_900_000_000_000),
            ("10us", 10_000),
            ("7ns", 7),
        ] {
            assert_eq!(
                Duration::parse(text).unwrap().0.as_nanos(),
                u128::from(nanos),
                "{text}"
            );
        }
        for bad in ["", "5", "5x", "-1s", "s", "1..5s", "1m30"] {
            assert!(Duration::parse(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn durations_print_back() {
        for text in ["1m30s", "0s", "1h2m3s500ms", "1s7ns"] {
            assert_eq!(Duration::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(Duration::parse("90s").unwrap().to_string(), "1m30s");
        assert_eq!(Duration::parse("1.5s").unwrap().to_string(), "1s500ms");
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("512M", 512u64 << 20),
            ("1g", 1 << 30),
            ("1GB", 1 << 30),
            ("100", 100),
            ("100b", 100),
            ("64k", 64 << 10),
            ("1.5g", 3 << 29),
            ("2t", 2 << 40),
        ] {
            assert_eq!(Bytes::parse(text).unwrap().0, bytes, "{text}");
        }
        assert_eq!(
            Bytes::parse("12X").unwrap_err().to_string(),
            "invalid size `12X`: unknown unit (use b, k, m, g or t)"
        );
        for bad in ["", "M", "-1m", "1.2.3m"] {
            assert!(Bytes::parse(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(Cpus::parse("0.5").unwrap().0, 500_000_000);
        assert_eq!(Cpus::parse("2").unwrap().0, 2_000_000_000);
        assert_eq!(Cpus::parse("0.50").unwrap(), Cpus::parse(".5").unwrap());
        assert_eq!(Cpus::parse("1.25").unwrap().to_string(), "1.25");
        for bad in ["0", "-1", "abc", "1e3", ""] {
            assert!(Cpus::parse(bad).is_err(), "{bad} should fail");
        }
    }
}
