//! Any string as an allowlist entry and as a host: never a panic, a parsed
//! entry prints back to itself, and a name always matches its own exact
//! entry.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice::policy::{Allowlist, Host, HostPattern, split_authority};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = s.parse::<HostPattern>() {
        let again: HostPattern = p.to_string().parse().expect("a printed entry parses");
        assert_eq!(again, p);
    }
    if let Ok((host, _)) = split_authority(s) {
        if let Host::Name(name) = &host {
            let list = Allowlist::new([HostPattern::Exact(name.clone(), None)]);
            assert!(list.decide(&host, 443, &[443]).is_ok());
        }
    }
});
