//! The name a client puts in the first bytes of a connection: the SNI of a TLS ClientHello, or the
//! Host header of an HTTP/1 request. Only read when a domain rule decides the flow.

/// What the first bytes say so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniff {
    /// A name was found (lower case, no port, no trailing dot).
    Name(String),
    /// The protocol was recognised but carries no name (TLS without SNI, HTTP without Host), or
    /// the bytes are something else.
    NoName,
    /// Not enough bytes yet to tell.
    NeedMore,
}

/// Reads at most this much before giving up on a name.
pub const MAX_SNIFF: usize = 16 * 1024 + 5;

pub fn sniff(buf: &[u8]) -> Sniff {
    match buf.first() {
        None => Sniff::NeedMore,
        Some(0x16) => tls_sni(buf),
        Some(b) if b.is_ascii_uppercase() => http_host(buf),
        Some(_) => Sniff::NoName,
    }
}

fn clean(name: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(name).ok()?.trim();
    let s = s.trim_end_matches('.').to_ascii_lowercase();
    (!s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)))
    .then_some(s)
}

fn http_host(buf: &[u8]) -> Sniff {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        // a request line must look like one early, or this is not HTTP
        let first = buf.split(|&b| b == b' ').next().unwrap_or(buf);
        if first.len() > 16 || !first.iter().all(|b| b.is_ascii_uppercase()) && buf.contains(&b' ')
        {
            return Sniff::NoName;
        }
        return if buf.len() >= 8 * 1024 {
            Sniff::NoName
        } else {
            Sniff::NeedMore
        };
    };
    for line in buf[..end].split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(colon) = line.iter().position(|&b| b == b':')
            && line[..colon].eq_ignore_ascii_case(b"host")
        {
            let v = &line[colon + 1..];
            let v = std::str::from_utf8(v).unwrap_or("").trim();
            // strip a port; an IPv6 literal in brackets is no name
            let host = if v.starts_with('[') {
                return Sniff::NoName;
            } else {
                v.rsplit_once(':').map_or(v, |(h, p)| {
                    if p.bytes().all(|b| b.is_ascii_digit()) {
                        h
                    } else {
                        v
                    }
                })
            };
            return clean(host.as_bytes()).map_or(Sniff::NoName, Sniff::Name);
        }
    }
    Sniff::NoName
}

/// A cursor over the ClientHello that fails soft: any short read means "need more" or "no name".
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at + n)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|s| s[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
    }
}

fn tls_sni(buf: &[u8]) -> Sniff {
    if buf.len() < 5 {
        return Sniff::NeedMore;
    }
    if buf[1] != 3 {
        return Sniff::NoName;
    }
    let rec_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf.len() < 5 + rec_len {
        return Sniff::NeedMore;
    }
    // The ClientHello must fit its first record (true for every client we know; a hello split
    // over records reads as "no name" and is refused by a domain rule).
    let mut c = Cur {
        b: &buf[5..5 + rec_len],
        at: 0,
    };
    let hello = (|| {
        if c.u8()? != 1 {
            return None;
        }
        c.take(3)?; // handshake length
        c.take(2 + 32)?; // version, random
        let sid = c.u8()?;
        c.take(sid)?;
        let suites = c.u16()?;
        c.take(suites)?;
        let comp = c.u8()?;
        c.take(comp)?;
        let ext_len = c.u16()?;
        let mut e = Cur {
            b: c.take(ext_len)?,
            at: 0,
        };
        while let Some(ty) = e.u16() {
            let len = e.u16()?;
            let body = e.take(len)?;
            if ty == 0 {
                let mut s = Cur { b: body, at: 0 };
                let list = s.u16()?;
                let mut l = Cur {
                    b: s.take(list)?,
                    at: 0,
                };
                while let Some(kind) = l.u8() {
                    let n = l.u16()?;
                    let name = l.take(n)?;
                    if kind == 0 {
                        return Some(clean(name));
                    }
                }
            }
        }
        Some(None)
    })();
    match hello {
        Some(Some(name)) => Sniff::Name(name),
        _ => Sniff::NoName,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2 ClientHello record with `sni` (if any).
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(n) = sni {
            let mut list = vec![0u8];
            list.extend((n.len() as u16).to_be_bytes());
            list.extend(n.as_bytes());
            let mut body = (list.len() as u16).to_be_bytes().to_vec();
            body.extend(list);
            ext.extend(0u16.to_be_bytes());
            ext.extend((body.len() as u16).to_be_bytes());
            ext.extend(body);
        }
        // an unrelated extension first would be realistic too: supported_groups
        let mut ext_all = vec![0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d];
        ext_all.extend(ext);
        let mut hello = vec![0x03, 0x03];
        hello.extend([7u8; 32]);
        hello.push(0); // session id
        hello.extend([0x00, 0x02, 0x13, 0x01]); // one suite
        hello.extend([0x01, 0x00]); // null compression
        hello.extend((ext_all.len() as u16).to_be_bytes());
        hello.extend(ext_all);
        let mut hs = vec![1u8];
        hs.extend(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend(hello);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn tls_sni_is_read_once_the_record_is_complete() {
        let rec = client_hello(Some("API.Example.com"));
        assert_eq!(sniff(&rec), Sniff::Name("api.example.com".into()));
        assert_eq!(sniff(&rec[..rec.len() - 1]), Sniff::NeedMore);
        assert_eq!(sniff(&rec[..3]), Sniff::NeedMore);
        assert_eq!(sniff(&client_hello(None)), Sniff::NoName);
    }

    #[test]
    fn http_host_without_port() {
        let req = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: a.test:8080\r\n\r\n";
        assert_eq!(sniff(req), Sniff::Name("a.test".into()));
        assert_eq!(sniff(&req[..20]), Sniff::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniff::NoName);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniff::NoName);
        assert_eq!(sniff(b"\x00\x01binary"), Sniff::NoName);
    }
}
