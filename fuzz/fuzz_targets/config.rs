//! The configuration file: `Config::parse`, `validate`, the warnings of `config check` and the
//! listener list `serve` binds. Besides "no panic": `config check` prints `effective_toml` for a
//! valid configuration, which promises to parse back to the same values, so an administrator can
//! save what it printed. An invalid one is never printed; its text need only parse again (its
//! domains, normalised once more, may lose another trailing dot: "a.." is refused either way).
#![no_main]

use libfuzzer_sys::fuzz_target;
use postroom::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text, "fuzz.toml") else { return };
    let valid = config.validate().is_ok();
    let _ = config.warnings();
    let _ = config.listeners();
    let shown = config.effective_toml();
    match Config::parse(&shown, "fuzz.toml") {
        Ok(again) if valid => {
            assert_eq!(again, config, "input {text:?} shown as {shown:?}");
            assert!(again.validate().is_ok(), "input {text:?} shown as {shown:?} is no longer valid");
        }
        Ok(_) => {}
        Err(e) => panic!("input {text:?} shown as {shown:?} does not parse back: {e}"),
    }
});
