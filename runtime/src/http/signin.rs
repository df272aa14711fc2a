//! The web page's sign-in: a form that takes a bearer token (a JWT of the identity provider
//! or a service token) and keeps it in an `HttpOnly; SameSite=Strict` cookie no script can
//! read. A browser with a client certificate the runtime trusts needs no sign-in. Failed
//! sign-ins are refused, audited and rate-limited per source like every other
//! authentication (`TwinApi::authenticate`).

use axum::Router;
use axum::extract::{Extension, Form, Query, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::{HttpState, Peer, SESSION_COOKIE, escape_html};
use crate::security::Credentials;

/// Longest token a form may carry.
const MAX_TOKEN: usize = 8192;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/signin", get(page).post(sign_in))
        .route("/signout", get(signed_out).post(sign_out))
}

#[derive(Debug, Deserialize)]
pub struct NextParam {
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct SignInForm {
    token: String,
    next: Option<String>,
}

/// A local path to return to (never another site: `//host` and schemes are refused).
fn local(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            n.to_owned()
        }
        _ => "/".into(),
    }
}

/// To the sign-in page, coming back to `uri` after.
pub fn redirect_to_signin(uri: &Uri) -> Response {
    let back = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut q = String::new();
    for b in back.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    see_other(&format!("/signin?next={q}"))
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn form_page(status: StatusCode, next: &str, message: &str) -> Response {
    let msg = if message.is_empty() {
        String::new()
    } else {
        format!(
            "<p class=\"error\" id=\"signin-error\">{}</p>",
            escape_html(message)
        )
    };
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign in · ferrotwin</title>\
         <link rel=\"stylesheet\" href=\"/static/app.css\"></head>\n<body class=\"signin\">\
         <h1>ferrotwin</h1>\n{msg}\
         <form method=\"post\" action=\"/signin\" id=\"signin\">\
         <label for=\"token\">Access token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required>\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <button type=\"submit\" id=\"signin-submit\">Sign in</button></form>\
         <p>A token from your identity provider or a service token (<code>ftk.…</code>). \
         A browser with a client certificate this runtime trusts is signed in without one.</p>\
         </body></html>\n",
        escape_html(next)
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn page(Query(q): Query<NextParam>) -> Response {
    form_page(StatusCode::OK, &local(q.next.as_deref()), "")
}

async fn sign_in(
    State(s): State<HttpState>,
    peer: Option<Extension<Peer>>,
    form: Result<Form<SignInForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return form_page(StatusCode::BAD_REQUEST, "/", "the form was not sent whole");
    };
    let next = local(f.next.as_deref());
    let token = f.token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN || !token.is_ascii() {
        return form_page(StatusCode::BAD_REQUEST, &next, "give a token");
    }
    let addr = peer.map(|Extension(p)| p.addr);
    let checked = s.api.authenticate(Credentials {
        bearer: Some(token),
        peer_cert: None,
        addr,
    });
    match checked {
        Ok(_) => {
            let secure = if s.tls { "; Secure" } else { "" };
            let cookie =
                format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}");
            let mut r = see_other(&next);
            match HeaderValue::from_str(&cookie) {
                Ok(v) => {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                    r
                }
                Err(_) => form_page(
                    StatusCode::BAD_REQUEST,
                    &next,
                    "that token cannot be kept in a cookie",
                ),
            }
        }
        Err(e) => form_page(StatusCode::UNAUTHORIZED, &next, &e.to_string()),
    }
}

async fn signed_out() -> Response {
    form_page(StatusCode::OK, "/", "signed out")
}

async fn sign_out(State(s): State<HttpState>) -> Response {
    let secure = if s.tls { "; Secure" } else { "" };
    let mut r = see_other("/signout");
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::local;

    #[test]
    fn only_local_paths_are_returned_to() {
        assert_eq!(local(Some("/alarms?path=acme")), "/alarms?path=acme");
        for evil in [
            "//evil.example",
            "/\t/evil.example",
            "/\\evil.example",
            "https://evil.example",
            "/ /evil",
        ] {
            assert_eq!(local(Some(evil)), "/", "{evil:?}");
        }
        assert_eq!(local(None), "/");
    }
}
