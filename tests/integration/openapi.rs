//! The OpenAPI document (`GET /openapi.json`) describes exactly the routes
//! the service serves: no route without a description, no description
//! without a route, method by method.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;
use wa_pair::link::whatsapp::{WhatsAppLinker, WhatsAppSettings};
use wa_pair::startup::App;

use crate::helpers::PINNED_VERSION;

/// Methods a route could answer to (HEAD and OPTIONS follow GET and CORS).
const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
];

/// What `{phone}` is replaced with when a route is probed.
const PHONE: &str = "628123456789";

/// The service as `App::build_with` makes it, never served: its router is
/// driven with `oneshot`.
async fn app(data_dir: &std::path::Path) -> App {
    let config = wa_pair::config::Config {
        port: 0,
        data_dir: data_dir.to_path_buf(),
        warm_clients: 0,
        ..wa_pair::config::Config::default()
    };
    // Nothing is probed that would connect: the URL only has to be valid.
    let linker = WhatsAppLinker::new(WhatsAppSettings {
        data_dir: config.data_dir.clone(),
        ws_url: Some("ws://127.0.0.1:9/ws".into()),
        version: Some(PINNED_VERSION),
        ..Default::default()
    })
    .expect("linker");
    App::build_with(
        &config,
        Arc::new(linker),
        Arc::new(wa_pair::store::MemoryStore::new()),
        Default::default(),
    )
    .await
    .expect("app builds")
}

async fn call(app: &App, method: Method, path: &str) -> (StatusCode, Vec<u8>) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .expect("request");
    let response = app
        .router()
        .clone()
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status();
    let body = response.into_body().collect().await.expect("body");
    (status, body.to_bytes().to_vec())
}

/// Every path the router has a route for, from its debug output (axum
/// has no public route listing; its `Debug` prints each route's path,
/// first those of its `path_router`, then its fallback's).
fn routed_paths(app: &App) -> BTreeSet<String> {
    let printed = format!("{:?}", app.router());
    let routes = printed
        .split_once("fallback_router")
        .map_or(printed.as_str(), |(routes, _)| routes);
    assert!(
        routes.contains("path_router"),
        "axum's Debug changed: {printed}"
    );
    let mut paths = BTreeSet::new();
    for piece in routes.split("RouteId(").skip(1) {
        if let Some(path) = piece
            .split_once("): \"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(path, _)| path)
            .filter(|path| path.starts_with('/'))
        {
            paths.insert(path.to_owned());
        }
    }
    paths
}

/// Asserts that `app`'s document and router agree, path by path and
/// method by method.
async fn assert_document_matches_router(app: &App) {
    // Arrange
    let (status, body) = call(app, Method::GET, "/openapi.json").await;
    let document: Value = serde_json::from_slice(&body).expect("JSON document");

    // Act
    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|key| METHODS.iter().any(|m| m.as_str().eq_ignore_ascii_case(key)))
                .map(move |method| (path.clone(), method.to_uppercase()))
        })
        .collect();
    let paths = routed_paths(app);
    let mut routed = BTreeSet::new();
    for path in &paths {
        let concrete = path.replace("{phone}", PHONE);
        for method in METHODS {
            let (status, _) = call(app, method.clone(), &concrete).await;
            if status != StatusCode::METHOD_NOT_ALLOWED {
                routed.insert((path.clone(), method.as_str().to_owned()));
            }
        }
    }

    // Assert
    assert_eq!(status, StatusCode::OK);
    assert_eq!(document["openapi"], "3.1.0");
    assert!(
        paths.contains("/pair") && paths.contains("/metrics"),
        "{paths:?}"
    );
    let documented_paths: BTreeSet<String> =
        documented.iter().map(|(path, _)| path.clone()).collect();
    assert_eq!(paths, documented_paths, "routed paths vs documented paths");
    assert_eq!(routed, documented, "routed methods vs documented methods");
}

#[tokio::test]
async fn the_document_lists_every_route_and_method_the_router_serves_and_no_other() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = app(dir.path()).await;

    assert_document_matches_router(&app).await;
}

#[cfg(feature = "sandbox")]
#[tokio::test]
async fn in_sandbox_mode_the_document_also_lists_the_sandbox_routes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = wa_pair::config::Config {
        port: 0,
        data_dir: dir.path().to_path_buf(),
        wa_sandbox: true,
        warm_clients: 0,
        ..wa_pair::config::Config::default()
    };
    let app = App::build(&config).await.expect("sandbox starts");

    assert!(routed_paths(&app).contains("/sandbox/phones/{phone}/enter-code"));
    assert_document_matches_router(&app).await;
}

#[tokio::test]
async fn every_documented_answer_names_an_error_schema_or_a_success_body() {
    // Arrange
    let dir = tempfile::tempdir().expect("temp dir");
    let app = app(dir.path()).await;
    let (_, body) = call(&app, Method::GET, "/openapi.json").await;
    let document: Value = serde_json::from_slice(&body).expect("JSON document");

    // Act
    let mut without_content = Vec::new();
    let mut errors_not_shared = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, answer) in operation["responses"].as_object().unwrap() {
                let content = &answer["content"];
                if content.is_null() {
                    without_content.push(format!("{method} {path} {status}"));
                }
                let schema = &content["application/json"]["schema"]["$ref"];
                if status.starts_with(['4', '5']) && schema != "#/components/schemas/Error" {
                    errors_not_shared.push(format!("{method} {path} {status}"));
                }
            }
        }
    }

    // Assert
    assert!(without_content.is_empty(), "{without_content:?}");
    assert!(errors_not_shared.is_empty(), "{errors_not_shared:?}");
    let pair = &document["paths"]["/pair"]["post"]["responses"];
    for status in ["201", "401", "408", "422", "429", "500", "503"] {
        assert!(pair[status].is_object(), "POST /pair lacks {status}");
    }
}
