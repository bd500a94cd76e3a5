//! A process's output log: a bounded queue of chunks shared by the pumps that read the
//! process's pipes (or PTY) and the streams that send them to clients.
//!
//! Invariants:
//! - At most `capacity` bytes are held (plus one chunk). When full, the oldest chunk is evicted
//!   only if every attached reader has already consumed it; otherwise the pump waits
//!   (backpressure reaches the process through its pipe). With no reader attached nothing
//!   blocks: old output is dropped, so an unwatched process never stalls.
//! - Each chunk gets a sequence number. `delivered` is the highest sequence any reader has taken;
//!   a reader attaching later (Connect) starts there, so output produced while nobody was
//!   attached is replayed (as much as the bound kept) and nothing is sent twice.
//! - The end event comes after the last chunk, once the pumps hit EOF and the process was reaped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use alcove_envd_proto::process::process_event::EndEvent;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Stdout(b) | Chunk::Stderr(b) | Chunk::Pty(b) => b.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Data(Chunk),
    End(EndEvent),
}

#[derive(Debug)]
struct Inner {
    chunks: VecDeque<Chunk>,
    /// Sequence number of `chunks[0]`.
    first_seq: u64,
    bytes: usize,
    readers: HashMap<u64, u64>,
    next_reader: u64,
    delivered: u64,
    end: Option<EndEvent>,
}

impl Inner {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.chunks.len() as u64
    }

    /// The oldest chunk may go if no attached reader still needs it.
    fn can_evict(&self) -> bool {
        self.readers.values().all(|&c| c > self.first_seq)
    }
}

#[derive(Debug)]
pub struct OutputLog {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Bumped whenever data or the end arrives (readers wait on it).
    data_tx: watch::Sender<u64>,
    /// Bumped whenever a reader advances or detaches (a blocked pump waits on it).
    progress_tx: watch::Sender<u64>,
}

impl OutputLog {
    pub fn new(capacity: usize) -> Arc<OutputLog> {
        Arc::new(OutputLog {
            inner: Mutex::new(Inner {
                chunks: VecDeque::new(),
                first_seq: 0,
                bytes: 0,
                readers: HashMap::new(),
                next_reader: 0,
                delivered: 0,
                end: None,
            }),
            capacity: capacity.max(64 * 1024),
            data_tx: watch::channel(0).0,
            progress_tx: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a chunk, waiting while the log is full of output an attached reader still needs.
    pub async fn push(&self, chunk: Chunk) {
        let mut progress = self.progress_tx.subscribe();
        loop {
            {
                let mut g = self.lock();
                while g.bytes + chunk.len() > self.capacity && !g.chunks.is_empty() && g.can_evict()
                {
                    if let Some(old) = g.chunks.pop_front() {
                        g.bytes -= old.len();
                        g.first_seq += 1;
                    }
                }
                if g.bytes + chunk.len() <= self.capacity || g.chunks.is_empty() {
                    g.bytes += chunk.len();
                    g.chunks.push_back(chunk);
                    drop(g);
                    self.data_tx.send_modify(|v| *v += 1);
                    return;
                }
                progress.mark_unchanged();
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    }

    /// Records the end; readers get it after the remaining chunks.
    pub fn finish(&self, end: EndEvent) {
        self.lock().end = Some(end);
        self.data_tx.send_modify(|v| *v += 1);
    }

    pub fn is_finished(&self) -> bool {
        self.lock().end.is_some()
    }

    /// A reader that sees everything from now on (Start attaches before the process runs).
    pub fn subscribe_from_start(self: &Arc<Self>) -> Subscription {
        self.attach(|g| g.first_seq)
    }

    /// A reader that starts after what was already delivered (Connect).
    pub fn subscribe_undelivered(self: &Arc<Self>) -> Subscription {
        self.attach(|g| g.delivered.max(g.first_seq))
    }

    fn attach(self: &Arc<Self>, start: impl FnOnce(&Inner) -> u64) -> Subscription {
        let mut g = self.lock();
        let id = g.next_reader;
        g.next_reader += 1;
        let cursor = start(&g);
        g.readers.insert(id, cursor);
        drop(g);
        Subscription {
            log: Arc::clone(self),
            id,
            data_rx: self.data_tx.subscribe(),
            done: false,
        }
    }
}

/// An attached reader. Dropping it detaches (and may unblock the pump).
#[derive(Debug)]
pub struct Subscription {
    log: Arc<OutputLog>,
    id: u64,
    data_rx: watch::Receiver<u64>,
    done: bool,
}

impl Subscription {
    /// The next chunk, or the end event once all output was read; None after the end.
    pub async fn next(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        loop {
            {
                let mut g = self.log.lock();
                let cursor = g.readers.get(&self.id).copied().unwrap_or(g.first_seq);
                let cursor = cursor.max(g.first_seq);
                if cursor < g.next_seq() {
                    let chunk = g.chunks[(cursor - g.first_seq) as usize].clone();
                    g.readers.insert(self.id, cursor + 1);
                    g.delivered = g.delivered.max(cursor + 1);
                    drop(g);
                    self.log.progress_tx.send_modify(|v| *v += 1);
                    return Some(Item::Data(chunk));
                }
                if let Some(end) = g.end.clone() {
                    self.done = true;
                    return Some(Item::End(end));
                }
                self.data_rx.mark_unchanged();
            }
            if self.data_rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.log.lock().readers.remove(&self.id);
        self.log.progress_tx.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn data(s: &'static str) -> Chunk {
        Chunk::Stdout(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn reader_sees_everything_then_end() {
        let log = OutputLog::new(0);
        let mut sub = log.subscribe_from_start();
        log.push(data("a")).await;
        log.push(data("b")).await;
        log.finish(EndEvent::default());
        assert_eq!(sub.next().await, Some(Item::Data(data("a"))));
        assert_eq!(sub.next().await, Some(Item::Data(data("b"))));
        assert!(matches!(sub.next().await, Some(Item::End(_))));
        assert_eq!(sub.next().await, None);
    }

    #[tokio::test]
    async fn slow_reader_applies_backpressure() {
        let log = OutputLog::new(64 * 1024);
        let mut sub = log.subscribe_from_start();
        let big = Chunk::Stdout(Bytes::from(vec![b'x'; 40 * 1024]));
        log.push(big.clone()).await;
        // The second chunk does not fit while the reader has not read the first.
        let l2 = Arc::clone(&log);
        let b2 = big.clone();
        let pending = tokio::spawn(async move { l2.push(b2).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pending.is_finished());
        assert_eq!(sub.next().await, Some(Item::Data(big.clone())));
        tokio::time::timeout(Duration::from_secs(1), pending)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sub.next().await, Some(Item::Data(big)));
    }

    #[tokio::test]
    async fn unattached_log_drops_oldest_and_late_reader_gets_undelivered() {
        let log = OutputLog::new(64 * 1024);
        {
            let mut sub = log.subscribe_from_start();
            log.push(data("seen")).await;
            assert_eq!(sub.next().await, Some(Item::Data(data("seen"))));
        }
        for _ in 0..4 {
            log.push(Chunk::Stdout(Bytes::from(vec![b'y'; 30 * 1024])))
                .await;
        }
        log.push(data("tail")).await;
        let mut late = log.subscribe_undelivered();
        let mut last = None;
        let mut total = 0;
        log.finish(EndEvent::default());
        while let Some(Item::Data(c)) = late.next().await {
            total += c.len();
            last = Some(c);
        }
        assert_eq!(last, Some(data("tail")));
        assert!(total <= 64 * 1024 + 4, "kept {total} bytes");
    }
}
