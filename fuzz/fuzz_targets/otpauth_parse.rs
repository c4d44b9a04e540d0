//! Fuzz the `otpauth://` parser: it must never panic, and whatever it accepts must
//! render to a URI that parses back to the same key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use twofold_core::uri::KeyUri;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(key) = KeyUri::parse(input) else {
        return;
    };
    let rendered = key.to_uri();
    let reparsed = KeyUri::parse(&rendered).expect("a rendered uri parses");
    assert_eq!(reparsed, key, "round trip changed the key");
});
