//! The pairing page at `GET /`: a person types a number, connects, sees the
//! code and the QR side by side, and watches the outcome arrive, in
//! Indonesian or English. Embedded in the binary (no build step, no CDN):
//! `index.html` is filled in here for one language, `app.js` and `app.css`
//! are served as they are. `UI_ENABLED=false` leaves the page out.

mod strings;

use std::sync::Arc;

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use self::strings::{Lang, STRINGS};

use super::AppState;

const PAGE: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Everything the page needs comes from this service; nothing else may run
/// or load. The page's dictionary sits in a `<script type="application/json">`,
/// which is data, not script.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// The page's routes.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(page))
        .routes(routes!(script))
        .routes(routes!(style))
}

/// `GET /` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// `id` or `en`; anything else falls back to `Accept-Language`.
    lang: Option<String>,
}

/// The pairing page, in Indonesian or English (`?lang=`, else
/// `Accept-Language`).
#[utoipa::path(
    get,
    path = "/",
    tag = "page",
    params(PageQuery),
    responses((status = 200, description = "The pairing page", content_type = "text/html", body = String)),
)]
async fn page(Query(query): Query<PageQuery>, headers: HeaderMap) -> Response {
    let lang = query
        .lang
        .as_deref()
        .and_then(Lang::from_tag)
        .unwrap_or_else(|| {
            Lang::from_accept_language(
                headers
                    .get(header::ACCEPT_LANGUAGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            )
        });
    let mut response = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        render(lang),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::VARY, HeaderValue::from_static("accept-language"));
    response
}

/// The page's script.
#[utoipa::path(
    get,
    path = "/ui/app.js",
    tag = "page",
    responses((status = 200, description = "The page's script", content_type = "text/javascript", body = String)),
)]
async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// The page's style sheet.
#[utoipa::path(
    get,
    path = "/ui/app.css",
    tag = "page",
    responses((status = 200, description = "The page's style sheet", content_type = "text/css", body = String)),
)]
async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Same binary, same asset: a new deploy is a new page load anyway.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The page in `lang`: every `{{key}}` replaced by its text, escaped, and
/// the whole dictionary for the script as JSON.
pub fn render(lang: Lang) -> String {
    let mut html = PAGE.replace("{{lang}}", lang.tag());
    let dictionary: serde_json::Map<String, serde_json::Value> = STRINGS
        .iter()
        .map(|s| (s.key.to_owned(), s.text(lang).into()))
        .collect();
    // `<` escaped, so no text can close the script element it sits in.
    let json = serde_json::Value::Object(dictionary)
        .to_string()
        .replace('<', "\\u003c");
    html = html.replace("{{i18n_json}}", &json);
    for string in STRINGS {
        html = html.replace(
            &format!("{{{{{}}}}}", string.key),
            &escape(string.text(lang)),
        );
    }
    html
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_of_the_page_is_filled_in_both_languages() {
        for lang in [Lang::Id, Lang::En] {
            let html = render(lang);

            assert!(!html.contains("{{"), "{lang:?}: {html}");
        }
    }

    #[test]
    fn the_indonesian_page_has_no_english_text() {
        // Arrange: the English strings that differ from their Indonesian
        // counterparts (names like "WhatsApp" and "Refresh Kode" are the
        // same in both and may appear).
        let english: Vec<&str> = STRINGS
            .iter()
            .filter(|s| s.en != s.id)
            .map(|s| s.en)
            .collect();

        // Act
        let html = render(Lang::Id);

        // Assert
        for text in english {
            assert!(
                !html.contains(text),
                "English left on the Indonesian page: {text}"
            );
        }
    }

    #[test]
    fn every_string_the_script_uses_is_in_the_dictionary() {
        let keys: Vec<&str> = STRINGS.iter().map(|s| s.key).collect();
        let used = SCRIPT
            .split("T.")
            .skip(1)
            .map(|rest| {
                rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")
            })
            .filter(|key| !key.is_empty());

        for key in used {
            assert!(
                keys.contains(&key),
                "app.js uses T.{key}, which is not defined"
            );
        }
    }

    #[test]
    fn accept_language_picks_the_preferred_of_the_two() {
        assert_eq!(
            Lang::from_accept_language("id-ID,id;q=0.9,en;q=0.8"),
            Lang::Id
        );
        assert_eq!(
            Lang::from_accept_language("en-US,en;q=0.9,id;q=0.8"),
            Lang::En
        );
        assert_eq!(Lang::from_accept_language("fr;q=1,id;q=0.5"), Lang::Id);
        assert_eq!(Lang::from_accept_language("en;q=0.2,id;q=0.7"), Lang::Id);
        assert_eq!(Lang::from_accept_language("fr"), Lang::En);
        assert_eq!(Lang::from_accept_language(""), Lang::En);
    }
}
