//! The link client's HTTP needs, served by reqwest.
//!
//! `whatsapp-rust` fetches `https://web.whatsapp.com/sw.js` on connect to
//! learn the current web client version (unless `WA_VERSION` pins one); its
//! default client is ureq, which we leave out to keep one HTTP stack.

use std::time::Duration;

use async_trait::async_trait;
use wacore::net::{HttpClient, HttpRequest, HttpResponse};

/// Whole-request timeout. The library bounds its version fetch at 20 s
/// itself; ours is a little shorter so our error, not its, explains a hang.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// Connect timeout: a dead network should fail fast.
pub const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// [`HttpClient`] over a shared reqwest client.
#[derive(Debug, Clone)]
pub struct ReqwestHttpClient {
    client: reqwest::Client,
}

impl ReqwestHttpClient {
    /// Builds the client with the timeouts above.
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(HTTP_CONNECT_TIMEOUT)
            .build()?;
        Ok(Self { client })
    }
}

#[async_trait]
impl HttpClient for ReqwestHttpClient {
    async fn execute(&self, request: HttpRequest) -> anyhow::Result<HttpResponse> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes())?;
        let mut builder = self.client.request(method, &request.url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        // A completed exchange is Ok whatever its status: the library reads
        // 4xx/5xx itself (see the trait's contract).
        let response = builder.send().await?;
        let status_code = response.status().as_u16();
        let body = response.bytes().await?.to_vec();
        Ok(HttpResponse { status_code, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    #[tokio::test]
    async fn execute_passes_headers_and_returns_non_2xx_as_a_response() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/sw.js"))
            .and(header("user-agent", "test-agent"))
            .respond_with(ResponseTemplate::new(404).set_body_string("nope"))
            .expect(1)
            .mount(&server)
            .await;
        let client = ReqwestHttpClient::new().unwrap();

        let response = client
            .execute(
                HttpRequest::get(format!("{}/sw.js", server.uri()))
                    .with_header("user-agent", "test-agent"),
            )
            .await
            .unwrap();

        assert_eq!(response.status_code, 404);
        assert_eq!(response.body, b"nope");
    }
}
