//! Fuzzes the domain-XML and lone-disk parsers, checking that an accepted definition round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmsnapd::fuzz::domain_xml(data);
});
