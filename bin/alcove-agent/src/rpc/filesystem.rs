//! `filesystem.Filesystem`: file and directory operations, run with the calling user's
//! credentials.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::Response;

use alcove_envd_proto::connect::Code;

use super::{Call, RpcError, error_response};
use crate::state::AgentState;

pub async fn handle(
    State(_state): State<Arc<AgentState>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    let call = match Call::from_request(req) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    error_response(
        call.codec,
        call.framing,
        RpcError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{method} is not implemented yet"),
        ),
    )
}
