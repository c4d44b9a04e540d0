//! QR codes of an `otpauth://` URI, for enrolment: SVG for web pages, PNG for
//! anything else, and text for terminals.
//!
//! Every output uses error correction level M and the standard quiet zone of four
//! modules, which phone cameras need to find the code. The input contains a
//! secret, so these functions never log it.

use qrcode::render::{svg as qr_svg, unicode};
use qrcode::types::QrError as EncodeError;
use qrcode::{EcLevel, QrCode};

/// Light modules around the code, as ISO/IEC 18004 requires.
const QUIET_ZONE: usize = 4;

/// Pixels per module in a PNG: large enough to scan from a screen at once.
const PNG_MODULE_PX: usize = 8;

const PNG_DARK: u8 = 0x00;
const PNG_LIGHT: u8 = 0xff;

/// Why a QR code could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    #[error("text is too long for a QR code")]
    TooLong,
    #[error("text cannot be encoded as a QR code: {0}")]
    Encode(EncodeError),
    #[error("png encoding failed")]
    Png(#[from] png::EncodingError),
}

/// An SVG document, black modules on white.
pub fn svg(text: &str) -> Result<String, QrError> {
    Ok(encode(text)?.render::<qr_svg::Color<'_>>().build())
}

/// An 8-bit grayscale PNG, black modules on white, eight pixels per module.
pub fn png(text: &str) -> Result<Vec<u8>, QrError> {
    let code = encode(text)?;
    let modules = code.width();
    let side = (modules + 2 * QUIET_ZONE) * PNG_MODULE_PX;
    let margin = QUIET_ZONE * PNG_MODULE_PX;

    let mut pixels = Vec::with_capacity(side * side);
    pixels.resize(margin * side, PNG_LIGHT);
    for row in code.to_colors().chunks(modules) {
        let mut line = Vec::with_capacity(side);
        line.resize(margin, PNG_LIGHT);
        for module in row {
            let shade = module.select(PNG_DARK, PNG_LIGHT);
            line.extend(std::iter::repeat_n(shade, PNG_MODULE_PX));
        }
        line.resize(side, PNG_LIGHT);
        for _ in 0..PNG_MODULE_PX {
            pixels.extend_from_slice(&line);
        }
    }
    pixels.resize(side * side, PNG_LIGHT);

    // At most (177 + 8) * 8 pixels a side, so the conversion cannot fail.
    let side = u32::try_from(side).map_err(|_| QrError::TooLong)?;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(out)
}

/// Text for a terminal, two module rows per line drawn with `▀`, `▄`, `█` and
/// spaces. Light modules are the drawn ones, so the code reads correctly on the
/// usual dark background. Lines are separated by `\n`, with none after the last.
pub fn terminal(text: &str) -> Result<String, QrError> {
    Ok(encode(text)?
        .render::<unicode::Dense1x2>()
        // Swapped on purpose: the renderer draws "dark" modules as blocks, and on
        // a dark terminal the blocks must be the light modules.
        .dark_color(unicode::Dense1x2::Light)
        .light_color(unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

fn encode(text: &str) -> Result<QrCode, QrError> {
    QrCode::with_error_correction_level(text, EcLevel::M).map_err(|error| match error {
        EncodeError::DataTooLong => QrError::TooLong,
        other => QrError::Encode(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "otpauth://totp/ACME%20Co:alice%40example.com\
        ?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=ACME%20Co\
        &algorithm=SHA1&digits=6&period=30";

    fn modules() -> usize {
        QrCode::with_error_correction_level(URI, EcLevel::M)
            .unwrap()
            .width()
    }

    #[test]
    fn svg_is_a_drawn_document() {
        let svg = svg(URI).unwrap();
        assert!(svg.starts_with("<?xml") || svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("<path") || svg.contains("<rect"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn png_decodes_to_the_expected_size() {
        let bytes = png(URI).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let reader = png::Decoder::new(std::io::Cursor::new(&bytes))
            .read_info()
            .unwrap();
        let info = reader.info();
        let side = u32::try_from((modules() + 2 * QUIET_ZONE) * PNG_MODULE_PX).unwrap();
        assert_eq!((info.width, info.height), (side, side));
        assert_eq!(info.color_type, png::ColorType::Grayscale);
    }

    #[test]
    fn png_pixels_follow_the_modules() {
        let bytes = png(URI).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes))
            .read_info()
            .unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut pixels).unwrap();
        let side = (modules() + 2 * QUIET_ZONE) * PNG_MODULE_PX;
        let margin = QUIET_ZONE * PNG_MODULE_PX;
        assert_eq!(pixels[0], PNG_LIGHT, "quiet zone");
        // Every QR code has a finder pattern with a dark corner at module (0, 0).
        assert_eq!(pixels[margin * side + margin], PNG_DARK);
        assert_eq!(pixels[side * side - 1], PNG_LIGHT, "quiet zone");
    }

    #[test]
    fn terminal_lines_have_one_width() {
        let text = terminal(URI).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let width = modules() + 2 * QUIET_ZONE;
        assert_eq!(lines.len(), width.div_ceil(2));
        for line in &lines {
            assert_eq!(line.chars().count(), width, "{line:?}");
            assert!(
                line.chars().all(|c| matches!(c, '▀' | '▄' | '█' | ' ')),
                "{line:?}"
            );
        }
        // The quiet zone is light, so the first line is solid blocks.
        assert!(lines[0].chars().all(|c| c == '█'), "{:?}", lines[0]);
    }

    #[test]
    fn too_long_input_is_an_error() {
        let long = "x".repeat(10_000);
        assert!(matches!(svg(&long), Err(QrError::TooLong)));
        assert!(matches!(png(&long), Err(QrError::TooLong)));
        assert!(matches!(terminal(&long), Err(QrError::TooLong)));
    }
}
