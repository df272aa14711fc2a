//! Page shells of the web browser: every page is `runtime/web/index.html` with the selected
//! path and the view put in (HTML-escaped); the page's script does the rest through the JSON
//! API. An unknown asset gets a 404 page naming it and linking its nearest existing parent.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferrotwin_models::AssetPath;
use serde::Deserialize;

use super::api::nearest_existing;
use super::error::HttpError;
use super::{HttpState, escape_html};

/// The shell; its placeholders are documented at its top.
const SHELL: &str = include_str!("../../web/index.html");

/// The shell for `view` with `path` selected (both escaped here).
pub fn shell(path: &str, view: &str) -> String {
    SHELL
        .replace("{{PATH}}", &escape_html(path))
        .replace("{{VIEW}}", &escape_html(view))
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(root))
        .route("/asset/{*path}", get(asset))
        .route("/alarms", get(alarms))
        .route("/overview", get(overview))
}

#[derive(Debug, Deserialize)]
pub struct PathParam {
    path: Option<String>,
}

async fn root() -> Response {
    html(StatusCode::OK, shell("", "tree"))
}

async fn asset(State(s): State<HttpState>, Path(path): Path<String>) -> Response {
    let found = AssetPath::parse(&path).ok().and_then(|p| s.api.find(&p));
    match found {
        Some(e) => html(StatusCode::OK, shell(e.path().as_str(), "tree")),
        None => not_found_page(
            &format!("/asset/{path}"),
            Some(
                nearest_existing(&s, &path)
                    .map(|e| e.path().to_string())
                    .unwrap_or_default(),
            ),
        ),
    }
}

/// A page scoped to `?path=` (a subtree); an unknown subtree is a 404 page like an asset's.
fn scoped(s: &HttpState, q: &PathParam, view: &str) -> Response {
    let path = q.path.as_deref().unwrap_or_default().trim_matches('/');
    if path.is_empty() {
        return html(StatusCode::OK, shell("", view));
    }
    match AssetPath::parse(path).ok().and_then(|p| s.api.find(&p)) {
        Some(e) => html(StatusCode::OK, shell(e.path().as_str(), view)),
        None => not_found_page(
            &format!("/{view}?path={path}"),
            Some(
                nearest_existing(s, path)
                    .map(|e| e.path().to_string())
                    .unwrap_or_default(),
            ),
        ),
    }
}

async fn alarms(State(s): State<HttpState>, Query(q): Query<PathParam>) -> Response {
    scoped(&s, &q, "alarms")
}

async fn overview(State(s): State<HttpState>, Query(q): Query<PathParam>) -> Response {
    scoped(&s, &q, "overview")
}

/// 404 page naming `what` (escaped); with `nearest` (an asset path, "" = none exists) it
/// links the nearest existing parent, else the start page.
pub fn not_found_page(what: &str, nearest: Option<String>) -> Response {
    let link = match nearest.as_deref() {
        Some(p) if !p.is_empty() => {
            let p = escape_html(p);
            format!("<p>Nearest existing parent: <a id=\"nearest\" href=\"/asset/{p}\">{p}</a></p>")
        }
        _ => "<p><a id=\"nearest\" href=\"/\">Start page</a></p>".to_string(),
    };
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Not found · ferrotwin</title>\
         <link rel=\"stylesheet\" href=\"/static/app.css\"></head>\n<body class=\"not-found\">\
         <h1>Not found</h1>\n<p>Nothing at <code>{}</code>.</p>\n{link}\n</body></html>\n",
        escape_html(what)
    );
    html(StatusCode::NOT_FOUND, body)
}

/// Anything no route matched: JSON under `/api/`, a 404 page elsewhere.
pub async fn fallback(uri: Uri) -> Response {
    let path = uri.path();
    if path.starts_with("/api/") {
        let mut e =
            HttpError::bad_request(format!("no API route {path} (see /api/v1/openapi.json)"));
        e.status = StatusCode::NOT_FOUND;
        return e.into_response();
    }
    not_found_page(path, None)
}
