//! Message bodies of several parts (RFC 5621, MIME multipart of RFC 2046):
//! finding the part of a given type, as SIP-I trunks send SDP beside ISUP.
//! Parts are binary (ISUP holds any octet), so all of it works on bytes.

use bytes::Bytes;

/// The content of the first part of `body` whose Content-Type is
/// `wanted` (lowercase, without parameters). `boundary` is the parameter
/// of the body's own Content-Type. A part after which no delimiter comes
/// is incomplete and never returned.
pub fn part(body: &Bytes, boundary: &str, wanted: &str) -> Option<Bytes> {
    if boundary.is_empty() {
        return None;
    }
    let delimiter = format!("--{boundary}");
    let delimiters = delimiter_lines(body, delimiter.as_bytes());
    delimiters.windows(2).find_map(|pair| {
        let (start, end) = (pair.first()?.1, pair.get(1)?.0);
        let part = body.get(start..end)?;
        let (headers, content) = split_part(part)?;
        (part_type(headers).as_deref() == Some(wanted))
            .then(|| body.slice(start + content.start..start + content.end))
    })
}

/// (where the line begins, where the next line begins) of each delimiter
/// line: one that starts with `delimiter` at the body's start or after a
/// line break.
fn delimiter_lines(body: &[u8], delimiter: &[u8]) -> Vec<(usize, usize)> {
    let mut lines = Vec::new();
    let mut from = 0;
    while let Some(found) = body.get(from..).and_then(|rest| find(rest, delimiter)) {
        let at = from + found;
        from = at + delimiter.len();
        let line_start = at == 0 || body.get(at - 1) == Some(&b'\n');
        if !line_start {
            continue;
        }
        let next_line = body
            .get(from..)
            .and_then(|rest| find(rest, b"\n"))
            .map_or(body.len(), |eol| from + eol + 1);
        lines.push((at, next_line));
    }
    lines
}

/// A part's header block and the range of its content: the line break
/// before the next delimiter belongs to the delimiter (RFC 2046 §5.1.1).
fn split_part(part: &[u8]) -> Option<(&[u8], std::ops::Range<usize>)> {
    let end = if part.ends_with(b"\r\n") {
        part.len() - 2
    } else if part.ends_with(b"\n") {
        part.len() - 1
    } else {
        part.len()
    };
    // A part that starts with a blank line has no headers.
    let (headers_end, content_start) = if part.starts_with(b"\r\n") {
        (0, 2)
    } else if part.starts_with(b"\n") {
        (0, 1)
    } else if let Some(at) = find(part, b"\r\n\r\n") {
        (at, at + 4)
    } else {
        let at = find(part, b"\n\n")?;
        (at, at + 2)
    };
    let headers = part.get(..headers_end)?;
    Some((headers, content_start..end.max(content_start)))
}

/// The Content-Type of a part from its headers (long or compact name),
/// lowercase and without parameters.
fn part_type(headers: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(headers);
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        (name.eq_ignore_ascii_case("content-type") || name.eq_ignore_ascii_case("c")).then(|| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDP: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";

    fn sip_i(isup: &[u8]) -> Bytes {
        let mut body = format!(
            "--unique-boundary-1\r\nContent-Type: application/sdp\r\n\r\n{SDP}\r\n\
             --unique-boundary-1\r\nContent-Type: application/ISUP;version=itu-t92+\r\n\
             Content-Disposition: signal;handling=optional\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(isup);
        body.extend_from_slice(b"\r\n--unique-boundary-1--\r\n");
        Bytes::from(body)
    }

    #[test]
    fn finds_sdp_beside_binary_isup() {
        let isup = [0x01, 0x00, 0x0d, 0x0a, 0x2d, 0x2d, 0x00, 0xff];
        let body = sip_i(&isup);
        let sdp = part(&body, "unique-boundary-1", "application/sdp");
        assert_eq!(sdp.as_deref(), Some(SDP.as_bytes()));
        let found = part(&body, "unique-boundary-1", "application/isup");
        assert_eq!(found.as_deref(), Some(&isup[..]));
    }

    #[test]
    fn preamble_compact_headers_and_bare_line_feeds() {
        let body = Bytes::from(format!(
            "preamble --b not a delimiter\n--b\nc: text/plain\n\nhello\n--b\n\
             c: Application/SDP ; charset=x\n\n{SDP}\n--b--\n"
        ));
        assert_eq!(
            part(&body, "b", "application/sdp").as_deref(),
            Some(SDP.as_bytes())
        );
        assert_eq!(
            part(&body, "b", "text/plain").as_deref(),
            Some(&b"hello"[..])
        );
    }

    /// Bodies assembled at random from the pieces the parser looks for:
    /// it never panics, and what it returns lies inside the body.
    #[test]
    fn random_bodies_never_panic() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        const PIECES: [&[u8]; 10] = [
            b"--b",
            b"--b--",
            b"\r\n",
            b"\n",
            b"\r",
            b"Content-Type: application/sdp",
            b"c:application/sdp;x",
            b"v=0",
            b"\0\xff",
            b"-",
        ];
        let mut rng = StdRng::seed_from_u64(5621);
        for _ in 0..20_000 {
            let body: Vec<u8> = (0..rng.random_range(0..24))
                .flat_map(|_| PIECES[rng.random_range(0..PIECES.len())].iter().copied())
                .collect();
            let body = Bytes::from(body);
            if let Some(found) = part(&body, "b", "application/sdp") {
                let inside = body
                    .windows(found.len().max(1))
                    .any(|w| found.is_empty() || w == &found[..]);
                assert!(inside, "{body:?} gave {found:?}");
            }
        }
    }

    #[test]
    fn no_such_part_no_closing_delimiter_and_garbage() {
        let body = sip_i(b"isup");
        assert_eq!(part(&body, "unique-boundary-1", "text/plain"), None);
        assert_eq!(part(&body, "other", "application/sdp"), None);
        assert_eq!(part(&body, "", "application/sdp"), None);
        let open = Bytes::from(format!("--b\r\nContent-Type: application/sdp\r\n\r\n{SDP}"));
        assert_eq!(part(&open, "b", "application/sdp"), None);
        for garbage in [
            "--b",
            "--b\r\n--b",
            "--b\r\n\r\n--b--",
            "--b--b--b",
            "\n--b\n\n",
        ] {
            let body = Bytes::from(garbage);
            assert_eq!(part(&body, "b", "application/sdp"), None, "{garbage:?}");
        }
    }
}
