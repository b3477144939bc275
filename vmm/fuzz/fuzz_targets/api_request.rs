//! The control API's request parser and checks: any line a client can send.
#![no_main]
use husk_vmm_api::{Request, VmState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    for fds in [0, 1, 17] {
        let _ = req.validate(fds);
    }
    for state in [
        VmState::Configuring,
        VmState::Running,
        VmState::Paused,
        VmState::Exited,
    ] {
        let _ = req.check_state(state);
    }
    // What parses must serialise back to something that parses the same.
    let again = serde_json::to_vec(&req).unwrap();
    assert_eq!(serde_json::from_slice::<Request>(&again).unwrap(), req);
});
