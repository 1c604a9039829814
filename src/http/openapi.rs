//! The OpenAPI 3.1 document of the API, served at `GET /openapi.json`.
//!
//! Each HTTP module adds its routes through `utoipa_axum`'s
//! `OpenApiRouter`, which takes a handler together with its
//! `#[utoipa::path]` description, so a route and its description are
//! written in one place. What every operation can answer whatever it does
//! (a timeout, an internal error, and for the API routes a refused caller
//! or an exhausted budget) is added here once, by [`add_shared_answers`].

use std::sync::{Arc, OnceLock};

use axum::Extension;
use axum::http::header;
use axum::response::IntoResponse;
use bytes::Bytes;
use utoipa::OpenApi;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;

use super::error::ErrorBody;
use crate::session::{PairState, Reason, Status};

/// The parts of the document no handler owns: what the API is, its
/// shared schemas, and how callers authenticate.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "wa-pair",
        description = "Links WhatsApp accounts to a server by 8-character pairing code. \
            Errors are `{\"error\": code, \"message\": text}`; the README's error table lists \
            every code.",
        license(name = "MIT"),
    ),
    components(schemas(ErrorBody, PairState, Status, Reason)),
    modifiers(&BearerAuth),
    tags(
        (name = "pairing", description = "Start, follow, refresh and cancel a pairing"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
        (name = "sandbox", description = "The fake phone, in sandbox mode only"),
    )
)]
pub struct ApiDoc;

/// Name of the security scheme the API routes list.
pub const BEARER: &str = "bearer";

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from `API_KEYS` (server callers) or a Supabase access \
                         token (signed-in users). Not needed when no caller is configured.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Adds the answers every operation shares: `408 request_timeout` and
/// `500 internal` everywhere; `401 unauthorized` and `429 rate_limited`
/// on operations that name a caller (those listing [`BEARER`]).
pub fn add_shared_answers(doc: &mut utoipa::openapi::OpenApi) {
    let bearer = SecurityRequirement::new(BEARER, Vec::<String>::new());
    for item in doc.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            add_answer(
                operation,
                "408",
                "`request_timeout`: the request took too long",
            );
            add_answer(operation, "500", "`internal`: a failure on our side");
            let names_a_caller = operation.security.iter().flatten().any(|r| *r == bearer);
            if names_a_caller {
                add_answer(
                    operation,
                    "401",
                    "`unauthorized`: no valid API key or Supabase token (`WWW-Authenticate: Bearer`)",
                );
                add_answer(
                    operation,
                    "429",
                    "`rate_limited`: the caller is over its request budget (`Retry-After`)",
                );
            }
        }
    }
}

fn add_answer(operation: &mut Operation, status: &str, description: &str) {
    operation
        .responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Error")))
                        .build(),
                )
                .build()
                .into()
        });
}

/// The document as JSON, rendered once when the router is built (after the
/// routes, this one included, are known).
#[derive(Clone)]
struct Rendered(Arc<OnceLock<Bytes>>);

/// The route serving the document `rendered` will hold.
pub fn routes<S: Clone + Send + Sync + 'static>(
    rendered: Arc<OnceLock<Bytes>>,
) -> OpenApiRouter<S> {
    // On this route only, so other requests do not carry it.
    OpenApiRouter::new()
        .routes(utoipa_axum::routes!(document))
        .route_layer(Extension(Rendered(rendered)))
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)),
)]
async fn document(Extension(Rendered(json)): Extension<Rendered>) -> impl IntoResponse {
    let json = json
        .get()
        .cloned()
        .unwrap_or_else(|| Bytes::from_static(b"{}"));
    ([(header::CONTENT_TYPE, "application/json")], json)
}
