//! Port specifications: the short syntax (`"8080:80"`,
//! `"127.0.0.1:8080:80/udp"`, `"[::1]:53:53/udp"`, ranges such as
//! `"8000-8002:80-82"`) expanded into one [`Port`] per target port.

use std::net::IpAddr;

use super::spec::{Port, PortMode, PortRange, Protocol};

/// Why a port specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The overall shape is wrong.
    #[error("invalid port `{text}`: {reason}")]
    Invalid {
        /// The specification as written.
        text: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(text: &str, reason: impl Into<String>) -> PortError {
    PortError::Invalid {
        text: text.to_string(),
        reason: reason.into(),
    }
}

/// Parses a protocol name.
pub fn parse_protocol(text: &str, whole: &str) -> Result<Protocol, PortError> {
    match text {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        other => Err(invalid(
            whole,
            format!("unknown protocol `{other}` (use tcp or udp)"),
        )),
    }
}

/// Parses a port number 1-65535 or an inclusive range `a-b`; `whole` is the
/// full specification, for the error.
pub fn parse_range(text: &str, whole: &str) -> Result<PortRange, PortError> {
    let number = |s: &str| -> Result<u16, PortError> {
        match s.trim().parse::<u16>() {
            Ok(0) => Err(invalid(whole, "port 0 is not allowed")),
            Ok(n) => Ok(n),
            Err(_) => Err(invalid(
                whole,
                format!("`{s}` is not a port number (1-65535)"),
            )),
        }
    };
    let range = match text.split_once('-') {
        Some((a, b)) => PortRange {
            start: number(a)?,
            end: number(b)?,
        },
        None => {
            let n = number(text)?;
            PortRange { start: n, end: n }
        }
    };
    if range.end < range.start {
        return Err(invalid(
            whole,
            format!("range `{text}` ends before it starts"),
        ));
    }
    Ok(range)
}

/// Parses the short syntax `[[host_ip:]published:]target[/protocol]`.
///
/// Ports are published in `ingress` mode, Swarm's default; a host address
/// only makes sense for `host` mode, so one given here selects `host` mode
/// (a Compose file written for one machine means "bind this address").
pub fn parse_short(text: &str) -> Result<Vec<Port>, PortError> {
    let (spec, protocol) = match text.rsplit_once('/') {
        Some((s, p)) => (s, parse_protocol(p, text)?),
        None => (text, Protocol::Tcp),
    };
    let (host_ip, rest) = if let Some(after) = spec.strip_prefix('[') {
        let (ip, rest) = after
            .split_once("]:")
            .ok_or_else(|| invalid(text, "unclosed `[` around the host address"))?;
        (Some(ip), rest)
    } else {
        let parts: Vec<&str> = spec.split(':').collect();
        match parts.len() {
            1 | 2 => (None, spec),
            3 => (
                Some(parts[0]),
                spec.split_once(':').map_or(spec, |(_, r)| r),
            ),
            _ => return Err(invalid(text, "too many `:`")),
        }
    };
    let host_ip: Option<IpAddr> = host_ip
        .map(|ip| {
            ip.parse()
                .map_err(|_| invalid(text, format!("`{ip}` is not an IP address")))
        })
        .transpose()?;
    let (published, target) = match rest.split_once(':') {
        Some(("", t)) => (None, t),
        Some((p, t)) => (Some(parse_range(p, text)?), t),
        None => (None, rest),
    };
    let target = parse_range(target, text)?;
    let mode = if host_ip.is_some() {
        PortMode::Host
    } else {
        PortMode::Ingress
    };
    let count = target.end - target.start;
    let port = |target: u16, published: Option<PortRange>| Port {
        target,
        published,
        protocol,
        mode,
        host_ip,
    };
    match published {
        None => Ok((target.start..=target.end).map(|t| port(t, None)).collect()),
        Some(p) if count == 0 => Ok(vec![port(target.start, Some(p))]),
        Some(p) if p.end - p.start == count => Ok((0..=count)
            .map(|i| {
                let n = p.start + i;
                port(target.start + i, Some(PortRange { start: n, end: n }))
            })
            .collect()),
        Some(_) => Err(invalid(
            text,
            "the published and target ranges have different sizes",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(target: u16, published: Option<(u16, u16)>, protocol: Protocol) -> Port {
        Port {
            target,
            published: published.map(|(start, end)| PortRange { start, end }),
            protocol,
            mode: PortMode::Ingress,
            host_ip: None,
        }
    }

    #[test]
    fn short_syntax() {
        use Protocol::*;
        assert_eq!(parse_short("80").unwrap(), [one(80, None, Tcp)]);
        assert_eq!(
            parse_short("8080:80").unwrap(),
            [one(80, Some((8080, 8080)), Tcp)]
        );
        assert_eq!(
            parse_short("53:53/udp").unwrap(),
            [one(53, Some((53, 53)), Udp)]
        );
        assert_eq!(
            parse_short("8000-8001:80-81").unwrap(),
            [
                one(80, Some((8000, 8000)), Tcp),
                one(81, Some((8001, 8001)), Tcp)
            ]
        );
        assert_eq!(
            parse_short("3000-3001").unwrap(),
            [one(3000, None, Tcp), one(3001, None, Tcp)]
        );
        assert_eq!(
            parse_short("9000-9010:80").unwrap(),
            [one(80, Some((9000, 9010)), Tcp)]
        );
        let p = parse_short("127.0.0.1:8080:80/udp").unwrap();
        assert_eq!(p[0].host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!((p[0].mode, p[0].protocol), (PortMode::Host, Udp));
        let p = parse_short("127.0.0.1::80").unwrap();
        assert_eq!(p[0].published, None);
        let p = parse_short("[::1]:8080:80").unwrap();
        assert_eq!(p[0].host_ip, Some("::1".parse().unwrap()));
    }

    #[test]
    fn errors() {
        for (text, message) in [
            (
                "80:http",
                "invalid port `80:http`: `http` is not a port number (1-65535)",
            ),
            (
                "70000:80",
                "invalid port `70000:80`: `70000` is not a port number (1-65535)",
            ),
            (
                "8080:80/sctp",
                "invalid port `8080:80/sctp`: unknown protocol `sctp` (use tcp or udp)",
            ),
            (
                "8000-8002:80-81",
                "invalid port `8000-8002:80-81`: the published and target ranges have different sizes",
            ),
            (
                "x:8080:80",
                "invalid port `x:8080:80`: `x` is not an IP address",
            ),
            ("0:80", "invalid port `0:80`: port 0 is not allowed"),
            (
                "90-80",
                "invalid port `90-80`: range `90-80` ends before it starts",
            ),
        ] {
            assert_eq!(parse_short(text).unwrap_err().to_string(), message);
        }
    }
}
