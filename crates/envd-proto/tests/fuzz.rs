//! Property-based fuzzing of the Connect envelope decoder and the message codecs: what the agent
//! reads from the host's requests and the host reads from the agent's responses. Cases:
//! PROPTEST_CASES (256 unless set; scripts/fuzz.sh runs 100,000).

use alcove_envd_proto::connect::{
    Codec, ENVELOPE_HEADER_LEN, EnvelopeDecoder, FLAG_COMPRESSED, FLAG_END_STREAM, FrameError,
    encode_end_stream, encode_envelope,
};
use alcove_envd_proto::filesystem::ListDirRequest;
use alcove_envd_proto::process::{ProcessConfig, StartRequest, StartResponse};
use proptest::prelude::*;

const MAX: usize = 4096;

/// The envelopes (flags, payload), the first error, and the bytes left buffered.
type Decoded = (Vec<(u8, Vec<u8>)>, Option<FrameError>, usize);

/// Feeds `bytes` in `chunks`-sized pieces, draining after each; returns the envelopes and the
/// first error.
fn decode_all(bytes: &[u8], chunks: &[usize]) -> Decoded {
    let mut d = EnvelopeDecoder::new(MAX);
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = chunks.iter().cycle();
    while at < bytes.len() {
        let n = (*sizes.next().unwrap()).max(1).min(bytes.len() - at);
        d.push(&bytes[at..at + n]);
        at += n;
        loop {
            match d.next_envelope() {
                Ok(Some(e)) => out.push((e.flags, e.payload.to_vec())),
                Ok(None) => break,
                Err(e) => return (out, Some(e), d.buffered()),
            }
        }
        // what is held back is at most one envelope in progress
        assert!(d.buffered() < ENVELOPE_HEADER_LEN + MAX, "{}", d.buffered());
    }
    (out, None, d.buffered())
}

proptest! {
    #[test]
    fn envelopes_round_trip_through_any_chunking(
        msgs in prop::collection::vec((prop::sample::select(vec![0u8, FLAG_END_STREAM]), prop::collection::vec(any::<u8>(), 0..MAX)), 0..8),
        chunks in prop::collection::vec(1usize..600, 1..8),
    ) {
        let mut bytes = Vec::new();
        for (f, p) in &msgs {
            bytes.extend_from_slice(&encode_envelope(*f, p));
        }
        let (got, err, left) = decode_all(&bytes, &chunks);
        prop_assert!(err.is_none());
        prop_assert_eq!(left, 0);
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn any_bytes_decode_or_fail_cleanly_within_the_bound(
        bytes in prop::collection::vec(any::<u8>(), 0..3 * MAX),
        chunks in prop::collection::vec(1usize..600, 1..8),
    ) {
        let (got, err, _) = decode_all(&bytes, &chunks);
        for (flags, p) in &got {
            prop_assert!(p.len() <= MAX);
            prop_assert_eq!(flags & FLAG_COMPRESSED, 0);
        }
        if let Some(FrameError::TooLarge { len, limit }) = err {
            prop_assert!(len > limit);
        }
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_before_buffering(len in (MAX as u32 + 1)..=u32::MAX, flags in any::<u8>()) {
        let mut d = EnvelopeDecoder::new(MAX);
        let mut h = vec![flags];
        h.extend(len.to_be_bytes());
        d.push(&h);
        prop_assert!(d.next_envelope().is_err());
    }

    #[test]
    fn end_stream_payloads_never_panic(p in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut d = EnvelopeDecoder::new(MAX);
        d.push(&encode_envelope(FLAG_END_STREAM, &p));
        let e = d.next_envelope().unwrap().unwrap();
        let _ = e.end_stream();
        let mut d = EnvelopeDecoder::new(MAX);
        d.push(&encode_end_stream(None));
        prop_assert!(d.next_envelope().unwrap().unwrap().end_stream().unwrap().error.is_none());
    }

    #[test]
    fn codecs_never_panic_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        for c in [Codec::Proto, Codec::Json] {
            let _ = c.decode::<StartRequest>(&bytes);
            let _ = c.decode::<StartResponse>(&bytes);
            let _ = c.decode::<ListDirRequest>(&bytes);
        }
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = Codec::from_content_type(s);
        }
    }

    #[test]
    fn json_shaped_input_never_panics(s in r#"\{("[a-zA-Z]{1,8}":(null|true|-?[0-9]{1,20}|"[^"\\]{0,10}"|\{\}|\[\]),?){0,6}\}"#) {
        let _ = Codec::Json.decode::<StartRequest>(s.as_bytes());
        let _ = Codec::Json.decode::<ListDirRequest>(s.as_bytes());
    }

    #[test]
    fn messages_round_trip_in_both_codecs(
        cmd in "\\PC{0,40}",
        args in prop::collection::vec("\\PC{0,20}", 0..5),
        envs in prop::collection::hash_map("[A-Z_]{1,10}", "\\PC{0,20}", 0..4),
        cwd in prop::option::of("/[a-z/]{0,30}"),
        depth in any::<u32>(),
    ) {
        let m = StartRequest {
            process: Some(ProcessConfig { cmd, args, envs, cwd }),
            ..Default::default()
        };
        let l = ListDirRequest { path: "/tmp".into(), depth };
        for c in [Codec::Proto, Codec::Json] {
            prop_assert_eq!(&c.decode::<StartRequest>(&c.encode(&m)).unwrap(), &m);
            prop_assert_eq!(&c.decode::<ListDirRequest>(&c.encode(&l)).unwrap(), &l);
        }
    }
}
