//! Static files of the dashboard, all in the binary: our stylesheet and script, and the browser
//! libraries `build.rs` installed from npm (pinned by `dashboard-js/package-lock.json`):
//! xterm.js (the terminal; MIT) and uPlot (the charts; MIT).

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

macro_rules! npm {
    ($file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/dashboard-node-modules/", $file))
    };
}

/// Name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("templates/style.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("templates/app.js"),
    ),
    (
        "xterm.js",
        "text/javascript; charset=utf-8",
        npm!("@xterm/xterm/lib/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css; charset=utf-8",
        npm!("@xterm/xterm/css/xterm.css"),
    ),
    (
        "addon-fit.js",
        "text/javascript; charset=utf-8",
        npm!("@xterm/addon-fit/lib/addon-fit.js"),
    ),
    (
        "uplot.js",
        "text/javascript; charset=utf-8",
        npm!("uplot/dist/uPlot.iife.min.js"),
    ),
    (
        "uplot.css",
        "text/css; charset=utf-8",
        npm!("uplot/dist/uPlot.min.css"),
    ),
];

pub async fn asset(Path(name): Path<String>) -> Response {
    let Some((_, ctype, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such dashboard asset").into_response();
    };
    let mut res = bytes.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The binary is the version: a restart may change them, an hour of caching is harmless.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    res
}
