//! The host channel's session semantics, with an in-memory stand-in for the virtio-serial port:
//! read() returns 0 while no host is connected, writes fail while disconnected, and every new
//! connection starts a fresh HTTP/2 session on the same port.

mod common;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use alcove_agent::channel::{self, Port};
use alcove_agent::state::{AgentState, StateConfig};
use alcove_agent_client::{AgentClient, Timeouts};
use common::{sh, text};

#[derive(Default)]
struct Wire {
    connected: bool,
    /// Reads that return 0 although a host is connected: a close notice that the guest kernel
    /// handles after the next host's first bytes.
    stale_eofs: usize,
    /// Reads served since the current host connected.
    reads: usize,
    epoch: u64,
    to_guest: VecDeque<u8>,
    to_host: VecDeque<u8>,
}

/// The guest end behaves like a virtio-serial port; the host end is a socket per connection.
#[derive(Default)]
struct FakePort {
    wire: Mutex<Wire>,
    cv: Condvar,
}

impl Port for FakePort {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut w = self.wire.lock().unwrap();
        loop {
            if !w.connected {
                return Ok(0);
            }
            // The late notice lands after the new host's first chunk, in front of its next one.
            if w.stale_eofs > 0 && w.reads > 0 && !w.to_guest.is_empty() {
                w.stale_eofs -= 1;
                return Ok(0);
            }
            if !w.to_guest.is_empty() {
                let n = buf.len().min(w.to_guest.len());
                for (i, b) in w.to_guest.drain(..n).enumerate() {
                    buf[i] = b;
                }
                w.reads += 1;
                return Ok(n);
            }
            w = self
                .cv
                .wait_timeout(w, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut w = self.wire.lock().unwrap();
        if !w.connected {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        w.to_host.extend(buf);
        self.cv.notify_all();
        Ok(buf.len())
    }
}

impl FakePort {
    /// Plugs a host in: returns the host's end of the new connection.
    fn connect(self: &Arc<Self>) -> tokio::net::UnixStream {
        let (host, bridge) = UnixStream::pair().unwrap();
        let epoch = {
            let mut w = self.wire.lock().unwrap();
            w.connected = true;
            w.epoch += 1;
            w.reads = 0;
            w.to_guest.clear();
            w.to_host.clear();
            w.epoch
        };
        let (port, mut from_host) = (Arc::clone(self), bridge.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            while let Ok(n) = from_host.read(&mut buf) {
                let mut w = port.wire.lock().unwrap();
                if n == 0 || w.epoch != epoch {
                    return;
                }
                w.to_guest.extend(&buf[..n]);
                port.cv.notify_all();
            }
        });
        let (port, mut to_host) = (Arc::clone(self), bridge);
        std::thread::spawn(move || {
            loop {
                let chunk: Vec<u8> = {
                    let mut w = port.wire.lock().unwrap();
                    while w.to_host.is_empty() && w.epoch == epoch && w.connected {
                        w = port
                            .cv
                            .wait_timeout(w, Duration::from_millis(100))
                            .unwrap()
                            .0;
                    }
                    if w.epoch != epoch || !w.connected {
                        let _ = to_host.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    w.to_host.drain(..).collect()
                };
                if to_host.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        host.set_nonblocking(true).unwrap();
        tokio::net::UnixStream::from_std(host).unwrap()
    }

    fn disconnect(&self) {
        let mut w = self.wire.lock().unwrap();
        w.connected = false;
        self.cv.notify_all();
    }
}

fn quick() -> Timeouts {
    Timeouts {
        request: Duration::from_secs(5),
        ..Timeouts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn sessions_restart_after_the_host_reconnects() {
    let port = Arc::new(FakePort::default());
    let state = AgentState::new(StateConfig {
        touch_system: false,
        output_buffer: 1 << 20,
    });
    let router = alcove_agent::api::router(state);
    tokio::spawn(channel::serve(Arc::clone(&port), router));

    // First host connection: a background process and a normal run.
    let client = AgentClient::connect_channel(port.connect(), quick())
        .await
        .unwrap();
    client.health().await.unwrap();
    let out = client.run(sh("echo first")).await.unwrap();
    assert_eq!(text(&out.stdout), "first\n");
    let long = client.clone();
    let pending = tokio::spawn(async move { long.run(sh("sleep 30")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The host goes away (as on snapshot): the in-flight call fails, nothing hangs.
    port.disconnect();
    let r = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err(), "the stream of a dead session must fail");

    // A new host connection starts a new session on the same port, several times over.
    for round in 0..3 {
        let client = AgentClient::connect_channel(port.connect(), quick())
            .await
            .unwrap();
        client.health().await.unwrap();
        let out = client
            .run(sh(&format!("echo round {round}")))
            .await
            .unwrap();
        assert_eq!(text(&out.stdout), format!("round {round}\n"));
        port.disconnect();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn large_output_crosses_the_channel() {
    let port = Arc::new(FakePort::default());
    let state = AgentState::new(StateConfig {
        touch_system: false,
        output_buffer: 1 << 20,
    });
    tokio::spawn(channel::serve(
        Arc::clone(&port),
        alcove_agent::api::router(state),
    ));
    let client = AgentClient::connect_channel(port.connect(), quick())
        .await
        .unwrap();
    let out = client
        .run(sh("head -c 5000000 /dev/zero | tr '\\0' a"))
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 5_000_000);
    assert!(out.stdout.iter().all(|&b| b == b'a'));
}

/// A host that reconnects faster than the guest notices the old one left: the new connection's
/// bytes arrive with no disconnect seen in between, and the old close notice shows up late as a
/// read of 0 in the middle of the new session. Neither may cost the new session its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn fast_reconnects_and_stale_close_notices_keep_sessions_whole() {
    let port = Arc::new(FakePort::default());
    let state = AgentState::new(StateConfig {
        touch_system: false,
        output_buffer: 1 << 20,
    });
    tokio::spawn(channel::serve(
        Arc::clone(&port),
        alcove_agent::api::router(state),
    ));
    for round in 0..5 {
        // No disconnect() between hosts: the next connect replaces the wire at once.
        let client = AgentClient::connect_channel(port.connect(), quick())
            .await
            .unwrap();
        client.health().await.unwrap();
        port.wire.lock().unwrap().stale_eofs = 1;
        let out = client
            .run(sh(&format!("echo round {round}")))
            .await
            .unwrap();
        assert_eq!(text(&out.stdout), format!("round {round}\n"));
    }
}
