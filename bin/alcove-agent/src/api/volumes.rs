//! `POST /alcove/volumes`: the host's volume session (Alcove extension, not envd). The request
//! body carries the host's frames (the hello, then answers), the response body the guest's (the
//! hello's answer, then requests); `crate::volumes` does the rest. Behind the access-token check
//! like every route; a caller inside the guest that opens one only serves its own sandbox's
//! mounts, whose files the host checks anyway.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures::StreamExt;
use http::StatusCode;

use crate::state::AgentState;

pub async fn session(State(state): State<Arc<AgentState>>, req: Request) -> Response {
    let body = req
        .into_body()
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other));
    let reader = tokio_util::io::StreamReader::new(body);
    let rx = state
        .volumes
        .session(reader, tokio::runtime::Handle::current());
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(tokio_stream_from(rx)))
        .expect("static response parts are valid")
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok)))
}
