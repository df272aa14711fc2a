//! Static files of the web browser, embedded in the binary (it works offline, no CDN, no JS
//! build step): served under `/static/{name}` with their content type, an ETag and
//! `Cache-Control: no-cache` (the browser revalidates and gets 304 while the binary is the same).
//! To add a file: put it under `runtime/web/` and add a line to `ASSETS`.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::HttpState;

pub struct Asset {
    /// Path under `/static/`.
    pub name: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

pub const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../web/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../web/app.css"),
    },
];

/// ETag of each asset (same order as `ASSETS`): a hash of its bytes, computed once.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                // `DefaultHasher::new` has fixed keys: the same bytes give the same tag in
                // every process, so a restart of the same binary keeps browser caches valid.
                let mut h = DefaultHasher::new();
                a.bytes.hash(&mut h);
                format!("\"{:016x}\"", h.finish())
            })
            .collect()
    })
}

pub fn routes() -> Router<HttpState> {
    Router::new().route("/static/{*file}", get(file))
}

async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.name == name) else {
        return super::pages::not_found_page(&format!("/static/{name}"), None);
    };
    let (a, tag) = (&ASSETS[i], &etags()[i]);
    let cache = [
        (header::ETAG, tag.as_str()),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    if fresh {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (cache, [(header::CONTENT_TYPE, a.content_type)], a.bytes).into_response()
}
