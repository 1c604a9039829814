//! `/pair/{phone}/qr.svg` and `/pair/{phone}/qr.png`: the session's current
//! QR code as a picture, for pages that cannot draw one themselves.
//!
//! The picture encodes the state's `qr` string exactly; it changes every time
//! WhatsApp rotates the QR (20 to 60 s), so it is never cached.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use qrcode::QrCode;
use qrcode::render::svg;
use time::OffsetDateTime;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::error::ErrorBody;
use super::extract::{PhoneParam, PhonePath};
use super::pair::actor;
use super::{ApiError, AppState};

/// Size of one QR module in the PNG, in pixels: a WhatsApp QR string (160
/// to 230 characters) needs 53 to 61 modules, so with its quiet zone the
/// picture is about 500 to 560 px, sharp for a phone held to the screen and
/// a few KiB to send.
pub const PNG_MODULE_PX: usize = 8;
/// The blank border every QR reader expects, in modules (the standard's 4).
pub const QUIET_ZONE_MODULES: usize = 4;
/// Smallest side of the SVG, in pixels, for clients that show it unscaled.
pub const SVG_MIN_PX: u32 = 264;

/// The QR picture routes.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(qr_svg))
        .routes(routes!(qr_png))
}

/// The current QR code as SVG.
#[utoipa::path(
    get,
    path = "/pair/{phone}/qr.svg",
    tag = "pairing",
    params(PhoneParam),
    responses(
        (status = 200, description = "The QR code the phone can scan now (`image/svg+xml`)", content_type = "image/svg+xml", body = String),
        (status = 403, description = "`forbidden`: another account started this session", body = ErrorBody),
        (status = 404, description = "`not_found` (no session) or `no_qr` (none showing now)", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn qr_svg(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
) -> Result<Response, ApiError> {
    let code = current_qr(&app, &caller, &phone).await?;
    let image = code
        .render::<svg::Color<'_>>()
        .min_dimensions(SVG_MIN_PX, SVG_MIN_PX)
        .quiet_zone(true)
        .build();
    Ok(picture("image/svg+xml", image.into_bytes()))
}

/// The current QR code as PNG.
#[utoipa::path(
    get,
    path = "/pair/{phone}/qr.png",
    tag = "pairing",
    params(PhoneParam),
    responses(
        (status = 200, description = "The QR code the phone can scan now (`image/png`)", content_type = "image/png", body = Vec<u8>),
        (status = 403, description = "`forbidden`: another account started this session", body = ErrorBody),
        (status = 404, description = "`not_found` (no session) or `no_qr` (none showing now)", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn qr_png(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
) -> Result<Response, ApiError> {
    let code = current_qr(&app, &caller, &phone).await?;
    let png = render_png(&code).map_err(|e| {
        tracing::error!(error = %e, "could not encode the QR code as PNG");
        ApiError::Internal
    })?;
    Ok(picture("image/png", png))
}

/// The phone's QR code, if its session shows one that is still scannable.
async fn current_qr(
    app: &AppState,
    caller: &Caller,
    phone: &crate::phone::PhoneNumber,
) -> Result<QrCode, ApiError> {
    let state = app
        .sessions
        .get(phone, &actor(app, caller, None))
        .await?
        .ok_or(ApiError::SessionNotFound)?;
    let live = state
        .qr_expires_at
        .is_none_or(|at| at > OffsetDateTime::now_utc());
    let payload = state.qr.filter(|_| live).ok_or(ApiError::NoQr)?;
    QrCode::new(payload.as_bytes()).map_err(|e| {
        tracing::error!(error = %e, "the QR string does not fit a QR code");
        ApiError::Internal
    })
}

fn picture(content_type: &'static str, body: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// `code` as an 8-bit greyscale PNG, [`PNG_MODULE_PX`] pixels per module,
/// with a [`QUIET_ZONE_MODULES`] border.
pub fn render_png(code: &QrCode) -> Result<Vec<u8>, png::EncodingError> {
    let modules = code.width();
    let colors = code.to_colors();
    let side_modules = modules + 2 * QUIET_ZONE_MODULES;
    let side = side_modules * PNG_MODULE_PX;
    let mut pixels = vec![u8::MAX; side * side];
    for (index, color) in colors.iter().enumerate() {
        if *color != qrcode::Color::Dark {
            continue;
        }
        let (x, y) = (index % modules, index / modules);
        let left = (x + QUIET_ZONE_MODULES) * PNG_MODULE_PX;
        let top = (y + QUIET_ZONE_MODULES) * PNG_MODULE_PX;
        for row in top..top + PNG_MODULE_PX {
            pixels[row * side + left..row * side + left + PNG_MODULE_PX].fill(0);
        }
    }
    let side_px = u32::try_from(side).unwrap_or(u32::MAX);
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side_px, side_px);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&pixels)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_has_a_quiet_zone_and_whole_modules() {
        // Arrange
        let code = QrCode::new(b"2@abc,def,ghi,jkl,1").unwrap();

        // Act
        let png = render_png(&code).unwrap();

        // Assert
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        let expected = (code.width() + 2 * QUIET_ZONE_MODULES) * PNG_MODULE_PX;
        assert_eq!(info.width as usize, expected);
        assert_eq!(info.height as usize, expected);
    }
}
