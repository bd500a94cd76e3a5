//! Property-based fuzzing of what the host reads first from a guest's channel: the stale bytes
//! before the agent's session marker. Cases: PROPTEST_CASES (256 unless set; scripts/fuzz.sh
//! runs 100,000).

use std::pin::Pin;
use std::task::{Context, Poll};

use alcove_agent_client::alcove_envd_proto::CHANNEL_SESSION_MARKER as MARKER;
use alcove_agent_client::channel::SkipToSession;
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Serves `data` in pieces of the given sizes (cycled).
struct Chunks {
    data: Vec<u8>,
    sizes: Vec<usize>,
    at: usize,
    i: usize,
}

impl AsyncRead for Chunks {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let n = me.sizes[me.i % me.sizes.len()]
            .max(1)
            .min(me.data.len() - me.at)
            .min(buf.remaining());
        me.i += 1;
        buf.put_slice(&me.data[me.at..me.at + n]);
        me.at += n;
        Poll::Ready(Ok(()))
    }
}

fn read_all(data: Vec<u8>, sizes: Vec<usize>) -> std::io::Result<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = SkipToSession::new(Chunks {
            data,
            sizes,
            at: 0,
            i: 0,
        });
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(out)
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

proptest! {
    #[test]
    fn the_stream_after_the_first_marker_is_delivered_whole(
        // stale bytes rich in marker pieces, so partial matches across chunks are exercised
        stale in prop::collection::vec(prop_oneof![any::<u8>(), prop::sample::select(MARKER.to_vec())], 0..300),
        after in prop::collection::vec(any::<u8>(), 0..300),
        sizes in prop::collection::vec(1usize..40, 1..6),
    ) {
        prop_assume!(!contains(&stale, MARKER));
        let mut data = stale.clone();
        // where the stale bytes end in a marker prefix, the first full marker starts inside them
        data.extend_from_slice(MARKER);
        data.extend_from_slice(&after);
        let first = data.windows(MARKER.len()).position(|w| w == MARKER).unwrap();
        let got = read_all(data.clone(), sizes).unwrap();
        prop_assert_eq!(&got[..], &data[first + MARKER.len()..]);
    }

    #[test]
    fn no_marker_means_nothing_is_delivered(
        data in prop::collection::vec(any::<u8>(), 0..2000),
        sizes in prop::collection::vec(1usize..400, 1..6),
    ) {
        prop_assume!(!contains(&data, MARKER));
        // EOF before a marker reads as an empty stream; nothing stale leaks through
        prop_assert_eq!(read_all(data, sizes).unwrap(), Vec::<u8>::new());
    }
}

#[test]
fn a_peer_that_never_sends_the_marker_is_cut_off() {
    let data = vec![b'x'; (1 << 20) + 8192];
    let e = read_all(data, vec![4096]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
}
