//! Fuzzes the libvirt `<domainsnapshot>` parsers (whole format and creation subset), checking that an accepted document round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmsnapd::fuzz::snapshot_xml(data);
});
