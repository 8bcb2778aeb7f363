//! The browser client (`logic/web/`): plain HTML, CSS and JavaScript compiled into the
//! binary, so standalone serves a working chat page with nothing else installed.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");
const SW_JS: &str = include_str!("../../web/sw.js");

/// The page sets its own Content-Security-Policy (meta tag); these headers keep browsers from
/// guessing types and from framing the page.
fn page(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub async fn index() -> impl IntoResponse {
    page("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn app_js() -> impl IntoResponse {
    page("text/javascript; charset=utf-8", APP_JS)
}

pub async fn style_css() -> impl IntoResponse {
    page("text/css; charset=utf-8", STYLE_CSS)
}

/// The service worker that shows Web Push notifications (`logic/web/sw.js`); at the root, so
/// its scope is the whole client.
pub async fn service_worker() -> impl IntoResponse {
    page("text/javascript; charset=utf-8", SW_JS)
}
