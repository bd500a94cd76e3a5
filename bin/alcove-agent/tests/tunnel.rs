//! `POST /alcove/tunnel`: byte tunnels to guest ports over the agent's HTTP/2 connection,
//! driven through `AgentClient::tunnel` (the host-mode agent connects to the host's loopback).

mod common;

use std::time::Duration;

use alcove_agent_client::ClientError;
use common::*;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(60);

/// Echoes every connection until the peer half-closes, then writes `bye` and closes.
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.write_all(b"bye").await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn bytes_round_trip_with_half_close() {
    let agent = Agent::start();
    let c = agent.client().await;
    let port = echo_server().await;
    let mut t = c.tunnel(port, None).await.expect("open tunnel");
    t.write_all(b"hello ").await.unwrap();
    t.write_all(b"guest").await.unwrap();
    let mut buf = [0u8; 11];
    tokio::time::timeout(T, t.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello guest");
    // Half-close: the server sees EOF, still answers, then closes; we read to EOF.
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, t.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"bye");
}

#[tokio::test]
async fn closed_port_is_port_not_open() {
    let agent = Agent::start();
    let c = agent.client().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    match c.tunnel(port, None).await {
        Err(ClientError::PortNotOpen(p)) => assert_eq!(p, port),
        other => panic!("expected PortNotOpen, got {other:?}"),
    }
    // The connection is still good afterwards, and the refusal is counted.
    c.health().await.unwrap();
    let port_open = echo_server().await;
    drop(c.tunnel(port_open, None).await.unwrap());
    let req = http::Request::get("/metrics?format=prometheus")
        .body(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap();
    let resp = c.send(req).await.unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("alcove_agent_tunnels_refused_total 1"),
        "{text}"
    );
    assert!(
        text.contains("alcove_agent_tunnels_opened_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn many_concurrent_tunnels_carry_large_streams_intact() {
    let agent = Agent::start();
    let c = agent.client().await;
    let port = echo_server().await;
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let t = c.tunnel(port, None).await.expect("open tunnel");
            let (mut r, mut w) = tokio::io::split(t);
            let data: Vec<u8> = (0..(2 << 20)).map(|n: u32| (n as u8) ^ i).collect();
            let want = Sha256::digest(&data);
            let writer = tokio::spawn(async move {
                for piece in data.chunks(100_000) {
                    w.write_all(piece).await.unwrap();
                }
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            tokio::time::timeout(T, r.read_to_end(&mut got))
                .await
                .expect("echo in time")
                .unwrap();
            writer.await.unwrap();
            assert_eq!(&got[got.len() - 3..], b"bye");
            assert_eq!(Sha256::digest(&got[..got.len() - 3]), want, "tunnel {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn a_slow_reader_holds_the_guest_back_without_loss() {
    let agent = Agent::start();
    let c = agent.client().await;
    // A server that writes 32 MB as fast as it can.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let total = 32usize << 20;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..(total >> 20) {
            s.write_all(&chunk).await.unwrap();
        }
        s.shutdown().await.unwrap();
    });
    let mut t = c.tunnel(port, None).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0;
    let mut pauses = 0;
    loop {
        let r = tokio::time::timeout(T, t.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if r == 0 {
            break;
        }
        assert!(buf[..r].iter().all(|b| *b == 7));
        n += r;
        if n < 4 << 20 && pauses < 20 {
            pauses += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(n, total);
}

#[tokio::test]
async fn dropping_a_tunnel_closes_the_guest_socket() {
    let agent = Agent::start();
    let c = agent.client().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        // A server that never writes: only the tunnel's close can end this read.
        let _ = s.read_to_end(&mut buf).await;
        let _ = tx.send(buf);
    });
    let mut t = c.tunnel(port, None).await.unwrap();
    t.write_all(b"abc").await.unwrap();
    t.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(t);
    let got = tokio::time::timeout(T, rx)
        .await
        .expect("guest socket closed")
        .unwrap();
    assert_eq!(got, b"abc");
}

#[tokio::test]
async fn tunnels_need_the_access_token_once_set() {
    let agent = Agent::start();
    let c = agent.client().await;
    let init = alcove_agent_client::InitRequest {
        access_token: Some("tok-1".into()),
        ..Default::default()
    };
    c.init(&init, None).await.unwrap();
    let port = echo_server().await;
    match c.tunnel(port, None).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status.as_u16(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let mut t = c.tunnel(port, Some("tok-1")).await.unwrap();
    t.write_all(b"x").await.unwrap();
    t.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, t.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"xbye");
}

/// A keep-alive HTTP/1.1 server answering `ok` to every request; counts connections.
async fn keepalive_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let conns = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.write_all(r).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (port, conns)
}

#[tokio::test]
async fn the_port_client_reuses_connections_per_sandbox_and_port() {
    use alcove_agent_client::{OpenTunnel, PortClient};
    use bytes::Bytes;
    use http_body_util::Empty;
    use std::sync::atomic::Ordering;

    let agent = Agent::start();
    let c = agent.client().await;
    let opened = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = opened.clone();
    let open: OpenTunnel = std::sync::Arc::new(move |id: String, port: u16| {
        let c = c.clone();
        seen.lock().unwrap().push((id, port));
        Box::pin(async move { c.tunnel(port, None).await })
    });
    let pc: PortClient<Empty<Bytes>> = PortClient::new(open);
    let (port, conns) = keepalive_server().await;
    for _ in 0..3 {
        let req = http::Request::get("/x").body(Empty::new()).unwrap();
        let resp = pc.send("sbxa", port, req, T).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "one connection for three requests"
    );
    // Another sandbox id never shares that connection.
    let req = http::Request::get("/x").body(Empty::new()).unwrap();
    assert_eq!(pc.send("sbxb", port, req, T).await.unwrap().status(), 200);
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    assert_eq!(
        *opened.lock().unwrap(),
        vec![("sbxa".to_string(), port), ("sbxb".to_string(), port)]
    );
    // A closed port is PortNotOpen, not a generic failure.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let req = http::Request::get("/").body(Empty::new()).unwrap();
    match pc.send("sbxa", closed, req, T).await {
        Err(ClientError::PortNotOpen(p)) => assert_eq!(p, closed),
        other => panic!("expected PortNotOpen, got {other:?}"),
    }
}
