//! Fuzzes the `a{sv}` options dictionaries as the D-Bus methods read them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmsnapd::fuzz::options(data);
});
